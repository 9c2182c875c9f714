add_executable(mdd_sample ${CMAKE_CURRENT_LIST_DIR}/main.cpp)
target_link_libraries(mdd_sample PRIVATE mdd::mdd CLI11::CLI11)
target_include_directories(mdd_sample PRIVATE ${CMAKE_CURRENT_LIST_DIR}/..)
