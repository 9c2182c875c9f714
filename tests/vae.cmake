mdd_add_test(test_vae SOURCES test_vae.cpp AREAS util io models)
