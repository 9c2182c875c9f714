#!/usr/bin/env bash
# Installs every Debian 12 package that building, testing and the demo need. Idempotent: packages
# already present are skipped and apt is not touched when nothing is missing.
set -euo pipefail
PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev libopenblas0-pthread          # LibTorch 1.13 (CPU); OpenBLAS: reference BLAS is tens of times slower
  libfmt-dev nlohmann-json3-dev libstb-dev zlib1g-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev
  python3-torch python3-numpy                # only to regenerate tests/data/*.pt fixtures (tests/data/make_pt_fixtures.py)
  dataset-fashion-mnist                      # the embedded CPU demo and evaluator checks
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all ${#PACKAGES[@]} packages present"
fi
