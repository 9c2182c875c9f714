add_executable(mdd_train_vae ${CMAKE_CURRENT_LIST_DIR}/main.cpp)
target_link_libraries(mdd_train_vae PRIVATE mdd::mdd CLI11::CLI11 nlohmann_json::nlohmann_json)
target_include_directories(mdd_train_vae PRIVATE ${CMAKE_CURRENT_LIST_DIR}/..)
