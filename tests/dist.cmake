mdd_add_test(test_dist SOURCES test_dist.cpp AREAS util dist)
mdd_add_test(test_dist_train SOURCES test_dist_train.cpp AREAS util io models diffusion minimax data train dist)
mdd_add_test(test_dist_sample SOURCES test_dist_sample.cpp AREAS util io models diffusion data eval dist)
