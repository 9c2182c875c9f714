# Model benchmarks (DiT step; the VAE decode benchmark can join this binary).
mdd_add_benchmark(bench_models
  SOURCES
    bench_dit.cpp
  AREAS util io models)
# GPU workloads of the paper's setting (scripts/gpu-check.sh); exits cleanly without CUDA.
mdd_add_benchmark(bench_gpu SOURCES bench_gpu.cpp AREAS util io models diffusion dist)
