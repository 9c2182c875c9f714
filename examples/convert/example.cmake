add_executable(mdd_convert ${CMAKE_CURRENT_LIST_DIR}/main.cpp)
target_link_libraries(mdd_convert PRIVATE mdd::mdd CLI11::CLI11)
