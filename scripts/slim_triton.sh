#!/usr/bin/env bash
# Build wheels/triton-3.9.0-slim.tar.xz: Triton 3.9's Python package for the GPU machines, whose
# image has Triton 3.6, small enough to travel with a device call (64 MiB in all). Left out:
# the AMD backend, CUPTI and the proton profiler, ptxas-blackwell, nvdisasm, FileCheck; the
# compiler library is stripped of debug information (500 -> 190 MB, 40 MB compressed).
# Use it with PYTHONPATH=<dir> TRITON_BACKENDS_IN_TREE=1 TRITON_PTXAS_BLACKWELL_PATH=<dir>/
# triton/backends/nvidia/bin/ptxas (Triton 3.9 asks for ptxas-blackwell even for sm_90).
#
#   scripts/slim_triton.sh [VERSION]        # needs pip (downloads the cp312 abi3 wheel) and strip
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.9.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q "triton==$version" --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux_2_27_x86_64 -d "$work"
mkdir "$work/x"
(cd "$work/x" && python3 -m zipfile -e "$work"/triton-"$version"-*.whl .)
t="$work/x/triton"
rm -rf "$t/backends/amd" "$t/backends/nvidia/lib/cupti" "$t/backends/nvidia/lib/cupti-blackwell" \
  "$t/backends/nvidia/bin/ptxas-blackwell" "$t/backends/nvidia/bin/nvdisasm" "$t/FileCheck" \
  "$t/_C/libproton.so"
strip "$t/_C/libtriton.so" "$t/backends/nvidia/bin/ptxas" "$t/backends/nvidia/bin/cuobjdump"
chmod +x "$t/backends/nvidia/bin/"*
mkdir -p wheels
out="$PWD/wheels/triton-$version-slim.tar.xz"
(cd "$work/x" && tar -cf - triton "triton-$version.dist-info" | xz -T2 -6 > "$out")
ls -la wheels/
