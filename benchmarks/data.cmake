# Image decode + preprocessing throughput and the threaded loader (images/s).
mdd_add_benchmark(bench_data SOURCES bench_data.cpp AREAS util io data)
# The JPEG fixture the benchmark re-encodes at ImageNet size.
target_compile_definitions(bench_data PRIVATE MDD_BENCH_DATA_DIR="${PROJECT_SOURCE_DIR}/tests/data")
