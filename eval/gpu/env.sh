#!/bin/bash
# On the GPU machine, after the sglang kit is installed into /tmp/site (../shared/gpu/README.md):
# install superinfer into the interpreter's site-packages (SGLang finds it by its plugin entry point)
# and run the given command with the kit's environment.   usage: bash eval/gpu/env.sh CMD...
set -e
export PYTHONPATH=/tmp/site CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index . > /dev/null
python3 -c "import superinfer.adapters.sglang.cli, sglang; print('superinfer + sglang', sglang.__version__)"
"$@"
