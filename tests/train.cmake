mdd_add_test(test_train SOURCES test_train.cpp AREAS util io models diffusion minimax data train dist)
