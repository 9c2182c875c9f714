add_executable(mdd_distill ${CMAKE_CURRENT_LIST_DIR}/main.cpp)
target_link_libraries(mdd_distill PRIVATE mdd::mdd CLI11::CLI11)
target_include_directories(mdd_distill PRIVATE ${CMAKE_CURRENT_LIST_DIR}/..)
