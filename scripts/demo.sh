#!/usr/bin/env bash
# The README's main command: set up, build, and distil Fashion-MNIST at IPC 10 on the CPU with the
# embedded default config, ending with the comparison table
#   random real | pre-trained DiT | DiffFit fine-tune | Minimax fine-tune (ours)   (dc protocol, 3 repeats)
#
#   ./scripts/demo.sh                       # everything (re-running reuses finished stages)
#   ./scripts/demo.sh --pretrain            # also re-train the generator from scratch: the VAE (1500 steps)
#                                           # and the latent DiT (5000 steps), the vae and pretrain sections
#   ./scripts/demo.sh --set finetune.steps=1000   # any mdd_distill option is passed through
#
# Outputs: runs/fashion-mnist/{report.json, report.md, contact_sheet.png, samples/<class>/<k>.png}.
# Interrupting it (Ctrl-C) during fine-tuning and running it again resumes from the last checkpoint.
#   BUILD_DIR  build folder (default build-demo)    JOBS  parallel compile jobs (default nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-demo}
JOBS=${JOBS:-$(nproc)}
t0=$(date +%s)
bash scripts/setup.sh
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DMDD_BUILD_TESTS=OFF -DMDD_BUILD_EXAMPLES=ON \
  -DMDD_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$BUILD_DIR" -j "$JOBS" --target mdd_distill
t1=$(date +%s)
echo "demo: setup + build took $((t1 - t0)) s"
"$BUILD_DIR/examples/mdd_distill" -c configs/fashion-mnist.json --threads "$(nproc)" "$@"
t2=$(date +%s)
echo "demo: distillation took $((t2 - t1)) s, total $((t2 - t0)) s"
