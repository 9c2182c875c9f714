mdd_add_test(test_minimax SOURCES test_minimax.cpp AREAS util io minimax)
