#!/bin/bash
# The SGLang router for the GPU machine (no network there): one more kit group beside
# ../shared/gpu/make_kit.sh's g1-g3, with sglang-router's wheel (abi3; its Python deps are in
# g1-g3). Run here, once:   bash eval/gpu/router_kit.sh [.stage]
# then on the GPU machine, right after g3:   bash .stage/g4/install.sh   (carry .stage/g4)
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=${1:-.stage}
version=0.3.2
mkdir -p "$stage/g4"
python3 -m pip download -q "sglang-router==$version" --no-deps -d "$stage/g4" \
  --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all:
cp "$stage/g1/install.sh" "$stage/g4/install.sh"
sed -i 's/g1/g4/g; s/(core, [0-9.]* MiB)/(sglang-router)/' "$stage/g4/install.sh"
du -sh "$stage/g4"
