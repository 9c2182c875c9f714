# Sampler step and training loss on DiT-S/2 (32x32 latents).
mdd_add_benchmark(bench_diffusion SOURCES bench_diffusion.cpp AREAS util io models diffusion dist)
