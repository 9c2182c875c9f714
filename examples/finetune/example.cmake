add_executable(mdd_finetune ${CMAKE_CURRENT_LIST_DIR}/main.cpp)
target_link_libraries(mdd_finetune PRIVATE mdd::mdd CLI11::CLI11)
target_include_directories(mdd_finetune PRIVATE ${CMAKE_CURRENT_LIST_DIR}/..)
