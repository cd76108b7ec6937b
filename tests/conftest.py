"""Without a GPU, Triton kernels run through the interpreter. The switch is read when a kernel is
decorated, so it must be set before any test module imports one."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
