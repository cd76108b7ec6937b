"""Without a GPU, Triton kernels run through the interpreter. The switch is read when a kernel is
decorated, so it must be set before any test module imports one."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# What SuperInfer's SGLang plugin does first when SGLang loads it (plugin.load -> cli.install):
# ServerArgs gains the rotasched choice and the --rota-* fields. Test modules import ServerArgs
# when they are collected, so it happens here, before them.
from superinfer.adapters.sglang.cli import install  # noqa: E402

install()
