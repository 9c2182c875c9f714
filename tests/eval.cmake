mdd_add_test(test_eval_nets SOURCES test_eval_nets.cpp AREAS util io models)
mdd_add_test(test_eval SOURCES test_eval.cpp AREAS util io models data eval dist)
