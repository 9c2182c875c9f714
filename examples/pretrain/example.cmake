add_executable(mdd_pretrain ${CMAKE_CURRENT_LIST_DIR}/main.cpp)
target_link_libraries(mdd_pretrain PRIVATE mdd::mdd CLI11::CLI11)
target_include_directories(mdd_pretrain PRIVATE ${CMAKE_CURRENT_LIST_DIR}/..)
