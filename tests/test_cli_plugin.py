"""The SGLang surface: CLI choice and flags (SGLang's own parser), and plugin registration.

The plugin entry point alone extends the CLI (no .pth, nothing at interpreter start). The tests
that need a fresh interpreter run each of SGLang's entry paths in a subprocess, with the HTTP
server or the engine's process launch replaced, so no model loads."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
from sglang.srt.server_args import ServerArgs

from superinfer.adapters.sglang import compat
from superinfer.adapters.sglang.cli import install, rota_config

ARGV = ["--model-path", "dummy", "--device", "cpu", "--schedule-policy", "rotasched",
        "--rota-ttft-slo", "0.5", "--rota-policy", "lvf"]
# Stands in for sglang.srt.entrypoints.http_server, which run_server imports after parsing.
FAKE_HTTP_SERVER = (
    "import sys, types\n"
    "def launch_server(server_args):\n"
    "    print('ARGS', getattr(type(server_args), '__superinfer__', False),\n"
    "          server_args.schedule_policy, server_args.rota_ttft_slo, server_args.rota_policy)\n"
    "    sys.stdout.flush()\n"
    "    after_parse(server_args)\n"
    "sys.modules['sglang.srt.entrypoints.http_server'] = "
    "types.SimpleNamespace(launch_server=launch_server)\n"
)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, env=dict(os.environ, **env), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def lines(out: subprocess.CompletedProcess, tag: str) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.startswith(tag)]


def parse(argv: list[str]) -> argparse.Namespace:
    """SGLang's own parser, as prepare_server_args builds it (minus the GPU-only post-init)."""
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(argv)


def test_server_args_carry_rotasched_fields():
    assert getattr(ServerArgs, "__superinfer__", False), "conftest's install() did not run"
    assert install() is ServerArgs  # idempotent: SGLang loads plugins once per process, or more
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
    assert rota_config(ns).host_numa_node == "auto" and rota_config(ns).write_through is False
    assert rota_config(parse(["--model-path", "m", "--rota-write-through"])).write_through is True
    # Write-through implies kept copies: RotaConfig sets keep_host_copy itself.
    assert rota_config(parse(["--model-path", "m", "--rota-write-through"])).keep_host_copy is True
    assert rota_config(ns).keep_host_copy is False
    numa = parse(["--model-path", "m", "--rota-host-numa-node", "1"])
    assert rota_config(numa).host_numa_node == "1"
    fields = set(compat.server_args_fields(ServerArgs))
    assert {"rota_ttft_slo", "rota_tbt_slo", "rota_host_kv_gb", "rota_policy"} <= fields


def test_server_args_built_before_the_plugin_loaded_is_named():
    """A ServerArgs built before SGLang loaded the plugin (sgl.Runtime does) lacks our fields."""
    from superinfer.config import ConfigError

    with pytest.raises(ConfigError, match="load_plugins"):
        rota_config(argparse.Namespace(schedule_policy="rotasched"))


def test_scheduler_policy_spelling_is_accepted():
    ns = parse(["--model-path", "m", "--scheduler-policy", "rotasched"])
    assert ns.schedule_policy == "rotasched"


@pytest.mark.parametrize("flags,needle", [
    (["--rota-tbt-slo", "-1"], "--rota-tbt-slo must be a positive finite number"),
    (["--rota-ttft-slo", "abc"], "--rota-ttft-slo expects a number"),
    (["--rota-host-kv-gb", "0"], "--rota-host-kv-gb must be a positive"),
    (["--rota-policy", "fifo"], "invalid choice"),
    (["--rota-link-share", "1.5"], "--rota-link-share must be in (0, 1]"),
    (["--rota-host-numa-node", "-1"], "--rota-host-numa-node must be 'auto', 'off' or a node"),
    (["--rota-host-numa-node", "grace"], "--rota-host-numa-node must be 'auto', 'off' or a"),
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


def test_nothing_runs_at_interpreter_start_and_sglang_plugins_opts_out():
    """Without the plugin loaded, ServerArgs is SGLang's own: no .pth or import hook is left
    over from older installs. SGLANG_PLUGINS without superinfer keeps it so."""
    code = ("from sglang.srt.server_args import ServerArgs\n"
            "print('PLAIN', hasattr(ServerArgs, 'rota_tbt_slo'))\n"
            "from sglang.srt.plugins import load_plugins\n"
            "load_plugins()\n"
            "import sglang.srt.server_args as m\n"
            "print('OPTED_OUT', hasattr(m.ServerArgs, 'rota_tbt_slo'))\n")
    out = run_python(code, SGLANG_PLUGINS="someone_else")
    assert lines(out, "PLAIN") == ["PLAIN False"]
    assert lines(out, "OPTED_OUT") == ["OPTED_OUT False"]


def test_launch_server_parses_flags_and_spawned_children_get_them():
    """``python -m sglang.launch_server``: load_plugins, then prepare_server_args, then
    run_server. A spawned child (as every scheduler is) unpickles the ServerArgs before it
    loads any plugin, and still gets the subclass with the values."""
    code = (
        "import multiprocessing as mp, runpy\n"
        "def after_parse(server_args):\n"
        "    child = mp.get_context('spawn').Process(target=print, args=(server_args,))\n"
        "    child.start(); child.join(); print('CHILD_EXIT', child.exitcode)\n"
        + FAKE_HTTP_SERVER +
        f"sys.argv = ['sglang.launch_server', *{ARGV!r}]\n"
        "runpy.run_module('sglang.launch_server', run_name='__main__', alter_sys=True)\n"
    )
    out = run_python(code)
    assert lines(out, "ARGS") == ["ARGS True rotasched 0.5 lvf"]
    assert lines(out, "CHILD_EXIT") == ["CHILD_EXIT 0"]
    # The child printed the repr of what it unpickled: only the subclass's repr has our fields.
    child = lines(out, "ServerArgs(")
    assert len(child) == 1 and "rota_ttft_slo=0.5" in child[0] and "rota_policy='lvf'" in child[0]
    assert "schedule_policy='rotasched'" in child[0]


def test_sglang_serve_parses_flags():
    """``sglang serve`` (the console script: sglang.cli.main) loads plugins before parsing.
    Its --help is printed before that, so it lists SGLang's flags only (README)."""
    code = (
        "def after_parse(server_args):\n"
        "    pass\n"
        + FAKE_HTTP_SERVER +
        f"sys.argv = ['sglang', 'serve', '--model-type', 'llm', *{ARGV!r}]\n"
        "from sglang.cli.main import main\n"
        "main()\n"
    )
    assert lines(run_python(code), "ARGS") == ["ARGS True rotasched 0.5 lvf"]


def test_engine_builds_server_args_with_rota_fields():
    """``sgl.Engine(**kwargs)`` loads plugins, then builds ``server_args_class(**kwargs)``; the
    engine module was imported (binding SGLang's class) before that."""
    code = (
        "import os, sys\n"
        "import sglang as sgl\n"
        "from sglang.srt.entrypoints.engine import Engine\n"
        "class Built(Exception):\n"
        "    pass\n"
        "def launch(*args, **kwargs):\n"
        "    raise Built(kwargs['server_args'])\n"
        "Engine._launch_subprocesses = staticmethod(launch)\n"
        "try:\n"
        "    sgl.Engine(model_path='dummy', device='cpu', schedule_policy='rotasched',\n"
        "               rota_ttft_slo=0.5)\n"
        "except Built as e:\n"
        "    a = e.args[0]\n"
        "    print('BUILT', type(a).__superinfer__, a.schedule_policy, a.rota_ttft_slo)\n"
        "sys.stdout.flush()\n"
        "os._exit(0)  # the engine's atexit shutdown has nothing to stop\n"
    )
    assert lines(run_python(code), "BUILT") == ["BUILT True rotasched 0.5"]


def test_server_args_pickle_round_trip_keeps_fields():
    """Scheduler processes are spawned: ServerArgs crosses by pickle."""
    import copy
    import pickle

    args = ServerArgs(model_path="dummy", device="cpu", schedule_policy="rotasched",
                      rota_tbt_slo=0.05)
    again = pickle.loads(pickle.dumps(args))
    assert type(again) is type(args) and again.rota_tbt_slo == 0.05
    assert compat.server_args_state(again) == compat.server_args_state(args)
    deep = copy.deepcopy(args)
    assert type(deep) is type(args) and deep.rota_tbt_slo == 0.05


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
        "         'process_batch_result', 'abort_request', 'is_fully_idle',\n"
        "         'init_load_inquirer']\n"
        "print(all(hasattr(getattr(Scheduler, n), '__wrapped__') for n in names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
