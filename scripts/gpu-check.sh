#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and Python's CUDA torch 2.x, build the CUDA variant
# of mdd against the LibTorch inside that torch, run the CUDA tests and the GPU benchmarks, and (where
# Python torch is present) the same DiT-XL/2 workloads in PyTorch eager for side-by-side ratios.
# Results (JSON + logs) go to RESULTS (default: $OUT when set, else ./gpu-results).
#
#   bash scripts/gpu-check.sh                 # on the GPU machine, from the project root
#
# Dependencies the GPU image lacks (fmt, nlohmann_json, stb, GoogleTest, Google Benchmark, CLI11):
# on the Debian build machine run `bash scripts/gpu-check.sh --fetch-deps` first; it fills .deps/
# (git-ignored) with Debian packages, which travel with the tree (`carry: [".deps"]`) and are unpacked
# into /tmp/deps there, never into /. Budget: about 10 minutes including the build (16 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-deps" ]; then
  grep -qx '/.deps/' .git/info/exclude 2>/dev/null || echo '/.deps/' >> .git/info/exclude
  mkdir -p .deps && cd .deps
  apt-get download -qq libfmt-dev libfmt9 nlohmann-json3-dev libstb-dev libstb0 libgtest-dev libgmock-dev \
    libbenchmark-dev libbenchmark1debian libcli11-dev zlib1g-dev
  ls -1 *.deb
  exit 0
fi

RESULTS=${RESULTS:-${OUT:-$PWD/gpu-results}}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU on this machine (nvidia-smi found none); nothing to check" >&2
  exit 2
fi
if ! "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu-check: Python torch with CUDA is missing or sees no GPU; it provides the LibTorch to build against" >&2
  exit 2
fi
start=$(date +%s)
nvidia-smi -L | tee "$RESULTS/gpu.txt"
"$PY" -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$RESULTS/gpu.txt"

# Dependencies: the system's when present, else the carried Debian packages.
PREFIXES=$("$PY" -c 'import torch;print(torch.utils.cmake_prefix_path)')
if [ -d .deps ] && ls .deps/*.deb >/dev/null 2>&1; then
  mkdir -p /tmp/deps
  for f in .deps/*.deb; do dpkg -x "$f" /tmp/deps; done
  export CPLUS_INCLUDE_PATH=/tmp/deps/usr/include${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
  export LIBRARY_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}
  export LD_LIBRARY_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  PREFIXES="$PREFIXES;/tmp/deps/usr"
fi
ARCH=$("$PY" -c 'import torch;p=torch.cuda.get_device_capability();print(f"{p[0]}{p[1]}")')
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S . -B build-cuda "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DMDD_WITH_CUDA=ON -DMDD_BUILD_TESTS=ON \
  -DMDD_BUILD_BENCHMARKS=ON -DMDD_BUILD_EXAMPLES=OFF -DCMAKE_PREFIX_PATH="$PREFIXES" \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH" > "$RESULTS/configure.log" 2>&1 || { tail -20 "$RESULTS/configure.log"; exit 1; }
cmake --build build-cuda -j "$(nproc)" --target test_cuda test_minimax bench_gpu bench_minimax \
  > "$RESULTS/build.log" 2>&1 || { tail -30 "$RESULTS/build.log"; exit 1; }
echo "gpu-check: built in $(( $(date +%s) - start )) s"

status=0
build-cuda/tests/test_cuda --gtest_output=json:"$RESULTS/test_cuda.json" 2>&1 | tee "$RESULTS/test_cuda.log" || status=1
build-cuda/tests/test_minimax --gtest_filter='*Cuda*:*CUDA*' --gtest_output=json:"$RESULTS/test_minimax_cuda.json" \
  2>&1 | tee "$RESULTS/test_minimax_cuda.log" || status=1
build-cuda/benchmarks/bench_gpu --benchmark_out="$RESULTS/bench_gpu.json" --benchmark_out_format=json \
  --benchmark_min_time=1 2>&1 | tee "$RESULTS/bench_gpu.log" || status=1
build-cuda/benchmarks/bench_minimax --benchmark_filter='cuda' --benchmark_out="$RESULTS/bench_minimax_cuda.json" \
  --benchmark_out_format=json 2>&1 | tee "$RESULTS/bench_minimax_cuda.log" || status=1
# PyTorch eager on the same workloads (our own script; the reference DiT architecture in ~100 lines).
"$PY" benchmarks/side_by_side.py --device cuda --workloads xl2 --json "$RESULTS/pytorch_eager.json" \
  2>&1 | tee "$RESULTS/pytorch_eager.log" || status=1
echo "gpu-check: done in $(( $(date +%s) - start )) s, status $status; results in $RESULTS"
exit $status
