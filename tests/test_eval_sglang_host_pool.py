"""eval.sglang_host_pool: SGLang's HiCache pools built for the bench's shape; on the CPU
(its transfer kernels are CUDA-only) it says why it measured nothing instead of failing."""

from __future__ import annotations

import pytest
import torch

from eval import sglang_host_pool
from superinfer.host_tier.interface import KVLayout

LAYOUT = KVLayout(3, 2, 8, 2)


@pytest.mark.parametrize("host_layout", sglang_host_pool.HOST_LAYOUTS)
def test_verify_reads_the_host_pool_in_its_own_layout(host_layout):
    dev, host = sglang_host_pool.build(LAYOUT, 256, 128, 16, "cpu", host_layout)
    assert host.size >= 128 and dev.k_buffer[0].shape[1:] == (2, 8)
    assert all(bool((b != 0).all()) for b in dev.k_buffer + dev.v_buffer)  # random, never zeros
    host_idx = torch.arange(16, 48)
    dev_idx = torch.cat([torch.arange(32, 48), torch.arange(96, 112)])
    for layer in range(3):  # what backup_from_device_all_layer would write, by hand
        for host_buf, dev_buf in ((host.k_buffer, dev.k_buffer), (host.v_buffer, dev.v_buffer)):
            if host_layout == "layer_first":
                host_buf[layer][host_idx] = dev_buf[layer][dev_idx]
            else:
                host_buf[host_idx, layer] = dev_buf[layer][dev_idx]
    assert sglang_host_pool._verify(dev, host, host_idx, dev_idx, host_layout)
    dev.v_buffer[2][dev_idx[-1]] += 1
    assert not sglang_host_pool._verify(dev, host, host_idx, dev_idx, host_layout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_on_the_cpu_it_reports_why_instead_of_failing():
    slots = torch.arange(64)
    result = sglang_host_pool.measure(LAYOUT, 256, slots[:32], slots[32:], [16, 32], reps=1)
    assert "error" in result and "rows" not in result
