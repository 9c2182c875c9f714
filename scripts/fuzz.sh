#!/usr/bin/env bash
# Sanitizer + fuzzing leg (issue: hostile inputs). Builds, with Clang, a separate tree in which the
# library is compiled with AddressSanitizer + UndefinedBehaviorSanitizer (+ libFuzzer coverage):
#   1. runs the loader, data and checkpoint tests under the sanitizers;
#   2. runs every libFuzzer target in fuzz/ for FUZZ_SECONDS (default 20) from a seed corpus made
#      of the files in tests/data (plus whatever an earlier run left in the corpus folder).
# A crash, sanitizer report or escaped non-mdd::Error exception fails the script; the reproducer
# is kept in $BUILD_DIR/fuzz-artifacts/.
#
#   scripts/fuzz.sh                  short CI run
#   FUZZ_SECONDS=1200 scripts/fuzz.sh   the long run recorded in docs/security.md
#   FUZZ_TARGETS="safetensors zip"   a subset;  BUILD_DIR (default build-fuzz), JOBS
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_DIR=${BUILD_DIR:-build-fuzz}
JOBS=${JOBS:-$(nproc)}
SECS=${FUZZ_SECONDS:-20}
TARGETS=${FUZZ_TARGETS:-"safetensors zip torch_checkpoint image idx config checkpoint"}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$ROOT}
export CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}
command -v clang++ >/dev/null || { echo "fuzz.sh: needs clang++ (apt install clang)" >&2; exit 1; }
start=$(date +%s)
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
LAUNCHER=()
command -v ccache >/dev/null && LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$BUILD_DIR" "${GEN[@]}" "${LAUNCHER[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER=clang++ -DMDD_BUILD_FUZZERS=ON -DMDD_BUILD_TESTS=ON \
  -DMDD_BUILD_EXAMPLES=OFF -DMDD_BUILD_BENCHMARKS=OFF -DMDD_USE_PCH=OFF >/dev/null
fuzzers=()
for t in $TARGETS; do fuzzers+=("fuzz_$t"); done
cmake --build "$BUILD_DIR" -j "$JOBS" --target test_io test_data test_train "${fuzzers[@]}"
echo "fuzz.sh: built in $(( $(date +%s) - start )) s"

# LibTorch is not instrumented and keeps process-lifetime allocations: no leak checking.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMP_NUM_THREADS=1
"$BUILD_DIR/tests/test_io"
"$BUILD_DIR/tests/test_data"
"$BUILD_DIR/tests/test_train" --gtest_filter='Checkpoint.*'
echo "fuzz.sh: sanitizer tests passed ($(( $(date +%s) - start )) s)"

# Seed corpora from the test fixtures (copied, so the fuzzer may add to them).
CORPUS=$BUILD_DIR/fuzz-corpus
ART=$BUILD_DIR/fuzz-artifacts
mkdir -p "$ART"
seed_into() { local t=$1; shift; mkdir -p "$CORPUS/$t"; for f in "$@"; do [ -f "$f" ] && cp -n "$f" "$CORPUS/$t/" 2>/dev/null || true; done; }
seed_into safetensors tests/data/*.safetensors tests/data/pt/*.safetensors tests/data/pt2/*.safetensors
seed_into zip tests/data/pt/*.pt tests/data/pt2/*.pt
seed_into torch_checkpoint tests/data/pt/*.pt tests/data/pt2/*.pt
seed_into image $(find tests/data/images -type f \( -name '*.png' -o -name '*.jpg' -o -name '*.JPEG' \) | head -20)
seed_into config configs/*.json
mkdir -p "$CORPUS/idx" "$CORPUS/checkpoint"
printf '{"step": 2, "weights_bytes": 96}' > "$CORPUS/checkpoint/seed.json"
FM=/usr/share/datasets/fashion-mnist
[ -f "$FM/t10k-labels-idx1-ubyte.gz" ] && { printf '\000'; cat "$FM/t10k-labels-idx1-ubyte.gz"; } > "$CORPUS/idx/labels-gz"

for t in $TARGETS; do
  mkdir -p "$CORPUS/$t"
  echo "fuzz.sh: fuzz_$t for $SECS s"
  "$BUILD_DIR/fuzz/fuzz_$t" -max_total_time="$SECS" -timeout=25 -rss_limit_mb=4096 -max_len=1048576 \
    -artifact_prefix="$ART/$t-" -print_final_stats=1 "$CORPUS/$t" 2>"$BUILD_DIR/fuzz-$t.log" ||
    { tail -60 "$BUILD_DIR/fuzz-$t.log"; echo "fuzz.sh: fuzz_$t FAILED (artifact in $ART)" >&2; exit 1; }
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$BUILD_DIR/fuzz-$t.log" | tr '\n' ' '; echo
done
echo "fuzz.sh: all done in $(( $(date +%s) - start )) s"
