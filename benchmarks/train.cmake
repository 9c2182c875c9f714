mdd_add_benchmark(bench_train SOURCES bench_train.cpp AREAS util io models diffusion minimax data train)
