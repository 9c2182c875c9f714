# Model benchmarks (DiT step; the VAE decode benchmark can join this binary).
mdd_add_benchmark(bench_models
  SOURCES
    bench_dit.cpp
  AREAS util io models)
