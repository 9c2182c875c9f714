mdd_add_benchmark(bench_vae SOURCES bench_vae.cpp AREAS util io models)
