"""SGLang's server with every data-parallel rank on one GPU: ``--gpu-id-step 0``, which
SGLang's own argument check refuses.

    python -m eval.e2e.shared_gpu_server --model-path M --dp-size 2 --gpu-id-step 0 ...

Why: the ``--dp-size 2`` end-to-end check (issue 16: outputs equal to an fcfs server of the
same shape after rotations, no leaked pages per rank) needs two GPUs, and the device machines
lent so far have one. Two DP ranks sharing one GPU still run SGLang's data-parallel controller,
one scheduler process per rank with its own KV pool and its own host tier; only the GPU (its
memory, and its SMs) is shared. An evaluation tool, not part of the package."""

from __future__ import annotations

import runpy

from sglang.srt.server_args import ServerArgs

_MARK = "_superinfer_shared_gpu"


def allow_shared_gpu() -> None:
    """Let ServerArgs take ``gpu_id_step`` 0 (idempotent): SGLang's check runs with the step
    at 1, everything else it checks unchanged, and the 0 is put back for the ranks' GPU ids
    (``base_gpu_id + k * gpu_id_step``)."""
    check = ServerArgs.check_server_args
    if getattr(check, _MARK, False):
        return

    def check_server_args(self: ServerArgs) -> None:
        step = self.gpu_id_step
        if step == 0:
            _set_sealed(self, "gpu_id_step", 1)
        try:
            check(self)
        finally:
            _set_sealed(self, "gpu_id_step", step)

    setattr(check_server_args, _MARK, True)
    ServerArgs.check_server_args = check_server_args


def _set_sealed(args: ServerArgs, name: str, value: object) -> None:
    """Assign a field of resolved ServerArgs, which SGLang seals with a ``__setattr__`` of its
    own (0.5.17 over ``object``'s, 0.5.23 over ``msgspec.Struct``'s): through the setter that
    one wraps."""
    mro = type(args).__mro__
    sealer = next(i for i, cls in enumerate(mro) if "__setattr__" in vars(cls))
    if mro[sealer] is object:  # not sealed
        setattr(args, name, value)
    else:
        mro[sealer + 1].__setattr__(args, name, value)


if __name__ == "__main__":
    allow_shared_gpu()
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
