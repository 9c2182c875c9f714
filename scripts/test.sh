#!/usr/bin/env bash
# The test command: install dependencies, configure, build, run every test, then build and run a
# program outside the tree against the installed package (find_package(mdd)).
#   BUILD_DIR   build folder (default build)        JOBS  parallel jobs (default nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
start=$(date +%s)
bash scripts/setup.sh
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DMDD_BUILD_TESTS=ON \
  -DMDD_BUILD_EXAMPLES=ON -DMDD_BUILD_BENCHMARKS=ON
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS"

# The installed package must work for an outside project.
PREFIX="$ROOT/$BUILD_DIR/install"
rm -rf "$PREFIX"
cmake --install "$BUILD_DIR" --prefix "$PREFIX" >/dev/null
# Relocatable: move the installed tree and consume it from its new place.
MOVED="$ROOT/$BUILD_DIR/install-moved"
rm -rf "$MOVED" && cp -a "$PREFIX" "$MOVED"
cmake -S examples/cmake_project -B "$BUILD_DIR/consumer" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$MOVED"
cmake --build "$BUILD_DIR/consumer" -j "$JOBS"
"$BUILD_DIR/consumer/mdd_consumer"

# The CUDA kernels must at least compile where nvcc exists (no GPU needed).
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  for cu in src/minimax/*.cu; do
    [ -e "$cu" ] || continue
    "$NVCC" -std=c++17 -O2 -Isrc -Iinclude -c "$cu" -o "$BUILD_DIR/$(basename "$cu").o"
    echo "nvcc: compiled $cu"
  done
fi
echo "test.sh: all green in $(( $(date +%s) - start )) s"
