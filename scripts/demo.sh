#!/usr/bin/env bash
# The README's main command: set up, build, and distil Fashion-MNIST at IPC 10 on the CPU with the
# embedded default config, ending with the comparison table
#   random real | pre-trained DiT | DiffFit fine-tune | Minimax fine-tune (ours)   (dc protocol, 3 repeats)
#
#   ./scripts/demo.sh                       # everything (re-running reuses finished stages)
#   ./scripts/demo.sh --pretrain            # also re-train the generator from scratch: the VAE (1500 joint
#                                           # + 4000 decoder-only steps)
#                                           # and the latent DiT (12000 steps), the vae and pretrain sections
#   ./scripts/demo.sh --set finetune.steps=1000   # any mdd_distill option is passed through
#
# Outputs: runs/fashion-mnist/{report.json, report.md, contact_sheet.png, samples/<class>/<k>.png}.
# Interrupting it (Ctrl-C) during fine-tuning and running it again resumes from the last checkpoint.
#
# LibTorch: the demo's stages run 1.4-1.7x faster on LibTorch 2.11 than on Debian's 1.13
# (docs/performance.md), so the demo builds against the PyPI wheel's LibTorch when
# `scripts/test.sh --torch2` has installed it (~/.cache/mdd/torch-<version>; its CMake config needs the
# CUDA toolkit, which it is built with) and against Debian's LibTorch otherwise.
#   --torch1   always Debian's LibTorch 1.13        --torch2   the wheel (error if it is not installed)
#   BUILD_DIR  build folder (default build-demo, build-demo-torch2)    JOBS  parallel compile jobs (default nproc)
#   DEMO_NPROC processes sharing the distillation (default 2 when the build has multi-process support
#              and the machine 2+ cores, else 1); each gets nproc / DEMO_NPROC threads
#
# Two processes: the demo's small DiT trains about 2x faster as 2 processes x 1 thread than as 1 x 2
# threads on a 2-core Xeon, and the 12 evaluation repeats are shared (docs/distributed.md). The
# results equal one process's up to float summation order (within 0.03 points).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=auto
ARGS=()
for a in "$@"; do
  case "$a" in
    --torch1) TORCH=1 ;;
    --torch2) TORCH=2 ;;
    *) ARGS+=("$a") ;;
  esac
done
JOBS=${JOBS:-$(nproc)}
t0=$(date +%s)
bash scripts/setup.sh
VER=${MDD_TORCH2_VERSION:-2.11.0}
VENV=${MDD_TORCH2_VENV:-$HOME/.cache/mdd/torch-$VER}
EXTRA=()
if [ "$TORCH" != 1 ]; then
  if [ -x "$VENV/bin/python" ] && PREFIX_PATH=$("$VENV/bin/python" -c 'import torch;print(torch.utils.cmake_prefix_path)' 2>/dev/null) \
     && NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null); then
    TORCH=2
    EXTRA=(-DCMAKE_PREFIX_PATH="$PREFIX_PATH" -DCMAKE_CUDA_COMPILER="$NVCC" -DMDD_WITH_CUDA=OFF)
  elif [ "$TORCH" = 2 ]; then
    echo "demo: --torch2 needs the wheel installed by ./scripts/test.sh --torch2 ($VENV) and the CUDA toolkit" >&2
    exit 1
  else
    TORCH=1
  fi
fi
if [ "$TORCH" = 2 ]; then
  BUILD_DIR=${BUILD_DIR:-build-demo-torch2}
  echo "demo: LibTorch $VER from $VENV"
else
  BUILD_DIR=${BUILD_DIR:-build-demo}
  echo "demo: Debian's LibTorch (./scripts/test.sh --torch2 installs the faster 2.x wheel the demo then uses)"
fi
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DMDD_BUILD_TESTS=OFF -DMDD_BUILD_EXAMPLES=ON \
  -DMDD_BUILD_BENCHMARKS=OFF "${EXTRA[@]}" >/dev/null
cmake --build "$BUILD_DIR" -j "$JOBS" --target mdd_distill
t1=$(date +%s)
echo "demo: setup + build took $((t1 - t0)) s"
# Multi-process support is a build-time finding (c10d + Gloo headers, see docs/distributed.md).
if [ -z "${DEMO_NPROC:-}" ]; then
  DEMO_NPROC=1
  if [ "$(nproc)" -ge 2 ] && grep -q '^MDD_C10D_GLOO_HEADER:FILEPATH=/' "$BUILD_DIR/CMakeCache.txt" &&
     grep -q '^MDD_GLOO_INCLUDE_DIR:PATH=/' "$BUILD_DIR/CMakeCache.txt" &&
     ! grep -q '^MDD_WITH_DIST:STRING=OFF' "$BUILD_DIR/CMakeCache.txt"; then
    DEMO_NPROC=2
  fi
fi
DEMO_THREADS=$(( $(nproc) / DEMO_NPROC )); [ "$DEMO_THREADS" -ge 1 ] || DEMO_THREADS=1
echo "demo: $DEMO_NPROC process(es) x $DEMO_THREADS thread(s)"
"$BUILD_DIR/examples/mdd_distill" -c configs/fashion-mnist.json --nproc "$DEMO_NPROC" --threads "$DEMO_THREADS" \
  ${ARGS[@]+"${ARGS[@]}"}
t2=$(date +%s)
echo "demo: distillation took $((t2 - t1)) s, total $((t2 - t0)) s"
