mdd_add_benchmark(bench_eval SOURCES bench_eval.cpp AREAS util io models data eval dist)
