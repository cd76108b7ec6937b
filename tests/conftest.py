"""Without a GPU, Triton kernels run through the interpreter. The switch is read when a kernel is
decorated, so it must be set before any test module imports one."""

import os
import random
import socket

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# What SuperInfer's SGLang plugin does first when SGLang loads it (plugin.load -> cli.install):
# ServerArgs gains the rotasched choice and the --rota-* fields. Test modules import ServerArgs
# when they are collected, so it happens here, before them.
from superinfer.adapters.sglang.cli import install  # noqa: E402

install()


@pytest.fixture
def port_base() -> int:
    """A base port for stand-in servers (tests/fake_sglang_server.py): the scripts put each
    server at base + 10 * i, so the 100 ports from base must be free. Below Linux's ephemeral
    range (32768 on), where the kernel hands out client ports: a block drawn there can be taken
    between the draw and the server's bind, and the server then fails to start."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 32000 - 100, 100)
        if all(_bindable(base + k) for k in range(100)):
            return base
    raise RuntimeError("no free block of 100 ports between 20000 and 32000")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
