"""The only place SuperInfer patches SGLang's scheduler, through SGLang's HookRegistry.

Every hook is a no-op unless the server runs ``--schedule-policy rotasched`` (or, for the
binding probe alone, ``--rota-monitor`` under another policy):
- ``init_schedule_policy``: SGLang's own SchedulePolicy runs as ``fcfs`` (we order the queue),
  and a ``Rotator`` is attached to the scheduler.
- ``get_next_batch_to_run``: one rotation step before SGLang builds the batch, the batch is
  built under the plan's prefill budget (``PrefillPacer.paced_prefill``), and the policy learns
  what the chosen batch will produce (``Rotator.on_launch``); under ``--rota-monitor`` the
  ``BindingProbe`` sees the chosen batch.
- ``_add_request_to_queue``: new (or retracted) requests enter the policy's table, their
  per-request SLO override under ``--rota-request-slo`` (``parse_request_slo``); a malformed or
  misspelled override, or in mode ``reject`` one tighter than the floor, is answered with HTTP
  400 instead.
- ``process_batch_result``: prefill/decode progress and finishes update the table.
- ``abort_request``: aborts reach requests that are rotated out.
- ``is_fully_idle``: rotated-out requests keep the scheduler awake; entering idle logs the
  pool check (device and host back at their initial free sizes) and the binding record.
- ``init_load_inquirer``: the load SGLang publishes (``/v1/loads``, ``/get_load``, DP
  balancing, the router) counts rotated-out requests (``load_signal.RotationAwareLoad``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from .cli import is_rotasched, rota_config

logger = logging.getLogger("superinfer")
_SCHED = "sglang.srt.managers.scheduler.Scheduler"


def _rotator(scheduler: Any):
    return getattr(scheduler, "_superinfer_rotator", None)


def _probe(scheduler: Any):
    return getattr(scheduler, "_superinfer_probe", None)


def _init_schedule_policy(original: Callable, self: Any, *args: Any, **kwargs: Any) -> Any:
    if not is_rotasched(self.server_args):
        result = original(self, *args, **kwargs)
        # NOTE: getattr: a ServerArgs built before the plugin loaded has no --rota-* fields,
        # and a server that does not rotate must start anyway.
        if getattr(self.server_args, "rota_monitor", False):
            from .binding_probe import BindingProbe

            self._superinfer_probe = BindingProbe(self)
        return result
    from .rotator import Rotator

    self.schedule_policy = "fcfs"
    try:
        result = original(self, *args, **kwargs)
    finally:
        self.schedule_policy = "rotasched"
    self._superinfer_rotator = Rotator(self, rota_config(self.server_args))
    return result


def _get_next_batch_to_run(original: Callable, self: Any, running_batch: Any, *args: Any,
                           **kwargs: Any) -> Any:
    rot = _rotator(self)
    if rot is None:
        plan = original(self, running_batch, *args, **kwargs)
        if (probe := _probe(self)) is not None:
            probe.launched(plan.batch_to_run)
        return plan
    last_batch = kwargs.get("last_batch", args[0] if args else None)
    running_batch = rot.step(running_batch, last_batch)
    self.running_batch = running_batch
    with rot.pacer.paced_prefill(rot.streams_decoding):
        plan = original(self, running_batch, *args, **kwargs)
    rot.on_launch(plan.batch_to_run)  # SGLang 0.5.17 returns a NextBatchPlan
    return plan


def _add_request_to_queue(original: Callable, self: Any, req: Any, *args: Any,
                          **kwargs: Any) -> Any:
    rot = _rotator(self)
    if rot is None:
        return original(self, req, *args, **kwargs)
    from ...config import ConfigError, parse_request_slo

    try:  # parsed once, here: the rotator gets the result
        slo = parse_request_slo(req.sampling_params.custom_params, rot.config)
    except ConfigError as e:
        from sglang.srt.disaggregation.utils import prepare_abort

        prepare_abort(req, str(e), status_code=HTTPStatus.BAD_REQUEST)
        self.output_streamer.stream_output([req], req.return_logprob)
        return None
    result = original(self, req, *args, **kwargs)
    queue = self.waiting_queue
    # NOTE: SGLang may also turn a request away here (queue limits); only queued ones count.
    # It appends, so the last element is the usual hit and the scan the rare case.
    if (queue and queue[-1] is req) or any(r is req for r in queue):
        rot.on_enqueue(req, slo)
    return result


def _process_batch_result(result: Any, self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    rot = _rotator(self)
    if rot is not None:
        rot.on_batch_result(batch)
    return result


def _abort_request(result: Any, self: Any, recv_req: Any, *args: Any, **kwargs: Any) -> Any:
    rot = _rotator(self)
    if rot is not None:
        rot.on_abort(recv_req.rid or "", bool(getattr(recv_req, "abort_all", False)))
    return result


def _is_fully_idle(result: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    rot = _rotator(self)
    if rot is None:
        if result and (probe := _probe(self)) is not None:
            probe.idle()
        return result
    idle = bool(result) and not rot.busy()
    if idle:
        rot.on_idle()  # logs once per idle period: the leak check the soak test reads
    return idle


def _init_load_inquirer(result: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    rot = _rotator(self)
    if rot is not None and hasattr(self, "load_inquirer"):
        from .load_signal import RotationAwareLoad

        self.load_inquirer = RotationAwareLoad(self.load_inquirer, rot.away_load)
    return result


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    around, after = HookType.AROUND, HookType.AFTER
    for name, hook, kind in (
        ("init_schedule_policy", _init_schedule_policy, around),
        ("get_next_batch_to_run", _get_next_batch_to_run, around),
        ("_add_request_to_queue", _add_request_to_queue, around),
        ("process_batch_result", _process_batch_result, after),
        ("abort_request", _abort_request, after),
        ("is_fully_idle", _is_fully_idle, after),
        ("init_load_inquirer", _init_load_inquirer, after),
    ):
        HookRegistry.register(f"{_SCHED}.{name}", hook, kind)
