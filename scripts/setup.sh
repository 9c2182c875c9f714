#!/usr/bin/env bash
# Installs every Debian 12 package that building, testing and the demo need. Idempotent: packages
# already present are skipped and apt is not touched when nothing is missing.
# (Regenerating the committed .pt test fixtures additionally needs python3-torch; see tests/data/README.md.)
set -euo pipefail
PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev libopenblas0-pthread          # LibTorch 1.13 (CPU); OpenBLAS: reference BLAS is tens of times slower
  libgloo-dev                                # Gloo's headers: multi-process support over LibTorch's c10d (src/dist)
  libfmt-dev nlohmann-json3-dev libstb-dev zlib1g-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev
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

# Debian's LibTorch links libblas.so.3; make sure the alternative resolves to OpenBLAS, not the
# reference BLAS (tens of times slower matrix products).
if command -v update-alternatives >/dev/null; then
  cur=$(update-alternatives --query libblas.so.3-x86_64-linux-gnu 2>/dev/null | awk '/^Value:/{print $2}')
  case "$cur" in
    *openblas*) ;;
    *) SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
       $SUDO update-alternatives --set libblas.so.3-x86_64-linux-gnu \
         /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 && echo "setup: BLAS -> OpenBLAS" ;;
  esac
fi
