mdd_add_test(test_dist SOURCES test_dist.cpp AREAS util dist)
