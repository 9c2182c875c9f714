add_executable(mdd_proxy ${CMAKE_CURRENT_LIST_DIR}/main.cpp)
target_link_libraries(mdd_proxy PRIVATE mdd::mdd CLI11::CLI11 nlohmann_json::nlohmann_json)
target_include_directories(mdd_proxy PRIVATE ${CMAKE_CURRENT_LIST_DIR}/..)
