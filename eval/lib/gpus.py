"""Which GPUs a run may use, and how to hand a subset of them to a server."""

from __future__ import annotations

import subprocess


def gpu_names() -> list[str]:
    """'name, memory' of every GPU nvidia-smi sees (empty without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def visible_devices(gpus: tuple[int, ...], inherited: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for GPU indices, relative to an inherited setting if there is one
    (a device lease may already have narrowed what this process sees)."""
    if inherited:
        pool = [g.strip() for g in inherited.split(",") if g.strip()]
        return ",".join(pool[i] for i in gpus)
    return ",".join(str(i) for i in gpus)


def visible_count(n_gpus: int, inherited: str | None) -> int:
    """GPUs this process may use: nvidia-smi's count, narrowed by an inherited setting."""
    if not inherited:
        return n_gpus
    return min(n_gpus, len([g for g in inherited.split(",") if g.strip()]))
