#!/usr/bin/env bash
# The test command: install dependencies, configure, build, run every test, then build and run a
# program outside the tree against the installed package (find_package(mdd)).
#
#   scripts/test.sh            Debian's LibTorch 1.13 (CPU)
#   scripts/test.sh --torch2   LibTorch 2.x from the pinned PyPI torch wheel (CUDA build: library,
#                              examples, tests and benchmarks compiled with MDD_WITH_CUDA=ON and
#                              nvcc; tests run on the CPU, CUDA tests skip without a GPU)
#
#   BUILD_DIR   build folder (default build / build-torch2)    JOBS  parallel jobs (default nproc)
#   MDD_TORCH2_VERSION  the wheel (default 2.11.0, the GPU machine's)
#   MDD_TORCH2_VENV     where it is installed once and reused (default ~/.cache/mdd/torch-<version>)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LEG=debian
[ "${1:-}" = "--torch2" ] && LEG=torch2
JOBS=${JOBS:-$(nproc)}
# Compiler-cache hits independent of where the clone lives (CI clones into a fresh folder).
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$ROOT}
export CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}
# OpenBLAS core type. Debian's OpenBLAS detects this project's AVX-512 machines itself (an AMD Zen 4
# runs its Cooperlake kernels), but the sessions' environment here forces OPENBLAS_CORETYPE=Haswell,
# and with those kernels DistSample.ShardedSamplingIsBitIdentical fails (the sharded ranks' samples
# differ from one process's by up to 6e-5; repeated sampling in one process stays bit-identical;
# cause inside OpenBLAS not pinned down). On a CPU with the AVX-512 subsets, a forced Haswell/Zen core
# type is dropped so OpenBLAS picks its own; any other explicit value is kept. docs/performance.md.
if [ "${OPENBLAS_CORETYPE:-}" = Haswell ] || [ "${OPENBLAS_CORETYPE:-}" = Zen ]; then
  if grep -q 'avx512f' /proc/cpuinfo 2>/dev/null && grep -q 'avx512bw' /proc/cpuinfo &&
     grep -q 'avx512dq' /proc/cpuinfo && grep -q 'avx512vl' /proc/cpuinfo; then
    echo "test.sh: OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE on an AVX-512 CPU: unset for the tests (see docs/performance.md)"
    unset OPENBLAS_CORETYPE
  fi
fi
start=$(date +%s)
bash scripts/setup.sh
# Public declarations must carry MDD_API (hidden visibility; the tests below link object libraries).
python3 scripts/check_exports.py
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
EXTRA=()
PREFIX_PATH=""
if [ "$LEG" = torch2 ]; then
  BUILD_DIR=${BUILD_DIR:-build-torch2}
  VER=${MDD_TORCH2_VERSION:-2.11.0}
  VENV=${MDD_TORCH2_VENV:-$HOME/.cache/mdd/torch-$VER}
  if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$VER')" 2>/dev/null; then
    echo "test.sh: installing torch==$VER into $VENV (once; reused by later runs)"
    python3 -m venv "$VENV" || { echo "test.sh: python3 -m venv failed (install python3-venv)" >&2; exit 1; }
    "$VENV/bin/pip" install -q "torch==$VER"
  fi
  PREFIX_PATH=$("$VENV/bin/python" -c 'import torch;print(torch.utils.cmake_prefix_path)')
  "$VENV/bin/python" -c 'import torch;print("test.sh: LibTorch", torch.__version__, "CUDA", torch.version.cuda)'
  NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  [ -x "$NVCC" ] || { echo "test.sh --torch2: needs the CUDA toolkit (nvcc) to build the CUDA variant" >&2; exit 1; }
  EXTRA=(-DMDD_WITH_CUDA=ON -DCMAKE_PREFIX_PATH="$PREFIX_PATH" -DCMAKE_CUDA_COMPILER="$NVCC"
         -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}")
else
  BUILD_DIR=${BUILD_DIR:-build}
fi
cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DMDD_BUILD_TESTS=ON \
  -DMDD_BUILD_EXAMPLES=ON -DMDD_BUILD_BENCHMARKS=ON "${EXTRA[@]}"
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
  -DCMAKE_PREFIX_PATH="$MOVED${PREFIX_PATH:+;$PREFIX_PATH}"
cmake --build "$BUILD_DIR/consumer" -j "$JOBS"
"$BUILD_DIR/consumer/mdd_consumer"

# The CUDA kernels must at least compile where nvcc exists (no GPU needed; the torch2 leg built them
# into the library already).
if [ "$LEG" = debian ] && { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; }; then
  NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  for cu in src/minimax/*.cu; do
    [ -e "$cu" ] || continue
    "$NVCC" -std=c++17 -O2 -Isrc -Iinclude -c "$cu" -o "$BUILD_DIR/$(basename "$cu").o"
    echo "nvcc: compiled $cu"
  done
fi
echo "test.sh ($LEG): all green in $(( $(date +%s) - start )) s"
