"""host_tier and the Triton kernels must import without SGLang (style rule 2)."""

import subprocess
import sys

MODULES = [
    "superinfer.host_tier.pool",
    "superinfer.host_tier.torch_mover",
    "superinfer.host_tier.staging",
    "superinfer.triton_kernels.kv_gather_scatter",
]


def test_imports_with_sglang_blocked() -> None:
    code = "import sys; sys.modules['sglang'] = None\n" + "\n".join(f"import {m}" for m in MODULES)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
