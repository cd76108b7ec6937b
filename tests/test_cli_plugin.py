"""The SGLang surface: CLI choice and flags (SGLang's own parser), and plugin registration."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
from sglang.srt.server_args import ServerArgs

from superinfer.adapters.sglang.cli import rota_config


def parse(argv: list[str]) -> argparse.Namespace:
    """SGLang's own parser, as prepare_server_args builds it (minus the GPU-only post-init)."""
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(argv)


def test_server_args_carry_rotasched_fields():
    assert getattr(ServerArgs, "__superinfer__", False), "the autoload hook did not run"
    ns = parse(["--model-path", "m", "--schedule-policy", "rotasched", "--rota-ttft-slo", "0.5",
                "--rota-policy", "lvf"])
    assert (ns.schedule_policy, ns.rota_ttft_slo, ns.rota_policy) == ("rotasched", 0.5, "lvf")
    assert ns.rota_tbt_slo == 0.1  # default
    assert ns.rota_disable_prefill_pacing is False
    assert ns.rota_link_share == 0.4
    assert rota_config(parse(["--model-path", "m", "--rota-link-share", "0.25"])).link_share == 0.25
    assert parse(["--model-path", "m", "--rota-disable-prefill-pacing"]).rota_disable_prefill_pacing
    assert rota_config(ns).keep_host_copy is False
    assert rota_config(parse(["--model-path", "m", "--rota-keep-host-copy"])).keep_host_copy is True
    assert rota_config(ns).host_numa_node is None and rota_config(ns).write_through is False
    assert rota_config(parse(["--model-path", "m", "--rota-write-through"])).write_through is True
    # Write-through implies kept copies: RotaConfig sets keep_host_copy itself.
    assert rota_config(parse(["--model-path", "m", "--rota-write-through"])).keep_host_copy is True
    assert rota_config(ns).keep_host_copy is False
    numa = parse(["--model-path", "m", "--rota-host-numa-node", "1"])
    assert rota_config(numa).host_numa_node == 1
    fields = {f.name for f in __import__("dataclasses").fields(ServerArgs)}
    assert {"rota_ttft_slo", "rota_tbt_slo", "rota_host_kv_gb", "rota_policy"} <= fields


def test_scheduler_policy_spelling_is_accepted():
    ns = parse(["--model-path", "m", "--scheduler-policy", "rotasched"])
    assert ns.schedule_policy == "rotasched"


@pytest.mark.parametrize("flags,needle", [
    (["--rota-tbt-slo", "-1"], "--rota-tbt-slo must be a positive finite number"),
    (["--rota-ttft-slo", "abc"], "--rota-ttft-slo expects a number"),
    (["--rota-host-kv-gb", "0"], "--rota-host-kv-gb must be a positive"),
    (["--rota-policy", "fifo"], "invalid choice"),
    (["--rota-link-share", "1.5"], "--rota-link-share must be in (0, 1]"),
    (["--rota-host-numa-node", "-1"], "--rota-host-numa-node must be >= 0"),
    (["--rota-host-numa-node", "grace"], "--rota-host-numa-node expects a node number"),
    (["--schedule-policy", "rotasched2"], "invalid choice"),
])
def test_bad_values_exit_2_with_a_message(flags, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--model-path", "m", "--schedule-policy", "rotasched", *flags])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_launch_server_help_lists_rotasched_and_flags():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for needle in ("rotasched", "--scheduler-policy", "--rota-ttft-slo", "--rota-tbt-slo",
                   "--rota-host-kv-gb", "--rota-policy"):
        assert needle in out.stdout


def test_opt_out_leaves_sglang_untouched():
    code = ("from sglang.srt.server_args import ServerArgs; "
            "print(hasattr(ServerArgs, 'rota_tbt_slo'))")
    env = dict(os.environ, SUPERINFER_AUTOLOAD="0")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_server_args_pickle_round_trip_keeps_fields():
    """Scheduler processes are spawned: ServerArgs crosses by pickle."""
    import pickle

    args = ServerArgs(model_path="dummy", device="cpu", schedule_policy="rotasched",
                      rota_tbt_slo=0.05)
    again = pickle.loads(pickle.dumps(args))
    assert type(again) is type(args) and again.rota_tbt_slo == 0.05


def test_plugin_entry_point_hooks_the_scheduler():
    code = (
        "from importlib.metadata import entry_points\n"
        "eps = [e for e in entry_points(group='sglang.srt.plugins') if e.name == 'superinfer']\n"
        "assert eps, 'entry point missing'\n"
        "eps[0].load()()\n"
        "from sglang.srt.plugins.hook_registry import HookRegistry\n"
        "HookRegistry.apply_hooks()\n"
        "from sglang.srt.managers.scheduler import Scheduler\n"
        "names = ['init_schedule_policy', 'get_next_batch_to_run', '_add_request_to_queue',\n"
        "         'process_batch_result', 'abort_request', 'is_fully_idle']\n"
        "print(all(hasattr(getattr(Scheduler, n), '__wrapped__') for n in names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
