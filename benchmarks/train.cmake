mdd_add_benchmark(bench_train SOURCES bench_train.cpp AREAS util io models diffusion minimax data train dist)
mdd_add_benchmark(bench_side_by_side SOURCES bench_side_by_side.cpp AREAS util io models diffusion minimax data eval train dist)
# PyTorch half of the harness: benchmarks/side_by_side.py (optional, needs Python torch).
