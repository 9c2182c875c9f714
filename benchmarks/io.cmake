mdd_add_benchmark(bench_io SOURCES bench_io.cpp AREAS util io)
