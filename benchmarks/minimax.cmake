mdd_add_benchmark(bench_minimax SOURCES bench_minimax.cpp AREAS util io minimax)
