"""One config surface: flags generated from RotaConfig's fields, one check per setting shared by
argparse and RotaConfig, and per-request SLOs parsed once."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
from sglang.srt.server_args import ServerArgs

from superinfer.adapters.sglang.cli import rota_config
from superinfer.config import ConfigError, RequestSlo, RotaConfig, parse_request_slo

# Flag -> (RotaConfig field, ServerArgs default). The flags users know: none may go missing.
FLAGS = {
    "--rota-ttft-slo": ("ttft_slo_s", 1.0),
    "--rota-tbt-slo": ("tbt_slo_s", 0.1),
    "--rota-host-kv-gb": ("host_kv_gb", 8.0),
    "--rota-policy": ("policy", "slo"),
    "--rota-mover": ("mover", "auto"),
    "--rota-slack-margin": ("slack_margin", 2.0),
    "--rota-link-share": ("link_share", 0.4),
    "--rota-keep-host-copy": ("keep_host_copy", False),
    "--rota-write-through": ("write_through", False),
    "--rota-host-numa-node": ("host_numa_node", None),
    "--rota-disable-prefill-pacing": ("prefill_pacing", False),
}
INTERNAL = {"reserve_window_s", "reserve_max_frac", "late_last", "lvf_budget_tokens",
            "min_prefill_chunk"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    return parser().parse_args(["--model-path", "m", *argv])


def dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def test_every_flag_is_generated_with_the_config_default_and_help():
    actions = {a.option_strings[0]: a for a in parser()._actions if a.option_strings}
    fields = {f.name for f in dataclasses.fields(ServerArgs)}
    defaults = RotaConfig()
    assert {name for name in actions if name.startswith("--rota-")} == set(FLAGS)
    for flag, (field, server_default) in FLAGS.items():
        assert dest(flag) in fields
        action = actions[flag]
        assert action.dest == dest(flag) and action.default == server_default
        assert getattr(ServerArgs, dest(flag)) == server_default
        assert action.help.startswith("rotasched: ") and len(action.help) > 20
        # The one inverted flag turns a default-on setting off.
        inverted = flag == "--rota-disable-prefill-pacing"
        assert getattr(defaults, field) == ((not server_default) if inverted else server_default)
        if isinstance(server_default, bool):
            assert server_default is False, f"{flag} is store_true: it can only turn on"
    assert actions["--rota-policy"].choices == ["slo", "lvf"]
    assert actions["--rota-mover"].choices == ["auto", "torch", "staging", "zerocopy", "direct"]
    assert "--scheduler-policy" in actions["--schedule-policy"].option_strings
    assert all(f.name in INTERNAL or f.name in {v[0] for v in FLAGS.values()}
               for f in dataclasses.fields(RotaConfig))
    assert not any(dest("--rota-" + name.replace("_", "-")) in fields for name in INTERNAL)


@pytest.mark.parametrize("flag,value,needle", [
    ("--rota-ttft-slo", "0", "must be a positive finite number"),
    ("--rota-ttft-slo", "inf", "must be a positive finite number"),
    ("--rota-tbt-slo", "nan", "must be a positive finite number"),
    ("--rota-tbt-slo", "fast", "expects a number"),
    ("--rota-host-kv-gb", "-8", "must be a positive finite number"),
    ("--rota-slack-margin", "0", "must be a positive finite number"),
    ("--rota-link-share", "0", "must be in (0, 1]"),
    ("--rota-link-share", "1.01", "must be in (0, 1]"),
    ("--rota-link-share", "half", "expects a number"),
    ("--rota-host-numa-node", "-1", "must be >= 0"),
    ("--rota-host-numa-node", "1.5", "expects a node number"),
])
def test_bad_flag_values_exit_2_naming_the_flag(flag, value, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse([flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {flag} {needle}" in err


@pytest.mark.parametrize("flag", ["--rota-policy", "--rota-mover"])
def test_bad_choices_exit_2_naming_the_flag(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse([flag, "fifo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: invalid choice: 'fifo'" in err


def test_server_args_round_trip_to_the_config():
    args = ServerArgs(model_path="dummy", device="cpu", schedule_policy="rotasched",
                      rota_ttft_slo=0.5, rota_tbt_slo=0.05, rota_host_kv_gb=2.0,
                      rota_policy="lvf", rota_mover="direct", rota_slack_margin=3.0,
                      rota_link_share=0.25, rota_keep_host_copy=True, rota_write_through=False,
                      rota_host_numa_node=1, rota_disable_prefill_pacing=True)
    assert rota_config(args) == RotaConfig(
        ttft_slo_s=0.5, tbt_slo_s=0.05, host_kv_gb=2.0, policy="lvf", mover="direct",
        slack_margin=3.0, link_share=0.25, keep_host_copy=True, write_through=False,
        host_numa_node=1, prefill_pacing=False)
    assert rota_config(ServerArgs(model_path="dummy", device="cpu")) == RotaConfig()
    assert rota_config(parse([])) == RotaConfig()
    assert rota_config(parse(["--rota-mover", "staging"])).mover == "staging"


def test_server_args_built_in_python_are_checked_too():
    """No argparse on this path: RotaConfig runs the flag's check and names the flag."""
    args = ServerArgs(model_path="dummy", device="cpu", rota_tbt_slo=-1.0)
    with pytest.raises(ConfigError, match="--rota-tbt-slo must be a positive finite number"):
        rota_config(args)


@pytest.mark.parametrize("field,value,needle", [
    ("ttft_slo_s", 0, "--rota-ttft-slo must be a positive finite number"),
    ("tbt_slo_s", float("nan"), "--rota-tbt-slo must be a positive finite number"),
    ("tbt_slo_s", "0.1", "--rota-tbt-slo expects a number"),
    ("host_kv_gb", True, "--rota-host-kv-gb expects a number"),
    ("slack_margin", math.inf, "--rota-slack-margin must be a positive finite number"),
    ("link_share", 1.5, "--rota-link-share must be in (0, 1]"),
    ("policy", "fifo", "--rota-policy must be one of"),
    ("mover", "dma", "--rota-mover must be one of"),
    ("host_numa_node", -1, "--rota-host-numa-node must be >= 0"),
    ("host_numa_node", 1.0, "--rota-host-numa-node expects a node number"),
    # Settings with no flag are named by their field, never by a flag that does not exist.
    ("reserve_window_s", -0.1, "reserve_window_s must be a finite number >= 0"),
    ("reserve_max_frac", 1.0, "reserve_max_frac must be in [0, 1)"),
    ("lvf_budget_tokens", -1, "lvf_budget_tokens must be >= 0"),
    ("min_prefill_chunk", 0, "min_prefill_chunk must be >= 1"),
])
def test_config_checks_name_the_setting(field, value, needle):
    with pytest.raises(ConfigError) as exc:
        RotaConfig(**{field: value})
    assert needle in str(exc.value)
    if field in INTERNAL:
        assert "--" not in str(exc.value)


def test_boundaries_that_are_allowed():
    assert RotaConfig(link_share=1.0).link_share == 1.0
    assert RotaConfig(reserve_window_s=0.0, reserve_max_frac=0.0, lvf_budget_tokens=0,
                      host_numa_node=0, min_prefill_chunk=1).host_numa_node == 0
    assert RotaConfig(ttft_slo_s=2).ttft_slo_s == 2  # ints are numbers of seconds too


def test_write_through_implies_keep_host_copy():
    assert RotaConfig(write_through=True).keep_host_copy is True
    assert RotaConfig(write_through=True, keep_host_copy=False).keep_host_copy is True
    kept = RotaConfig(keep_host_copy=True)
    assert kept.keep_host_copy is True and kept.write_through is False
    assert RotaConfig().keep_host_copy is False
    assert not hasattr(RotaConfig(), "keeps_host_copies")
    assert rota_config(parse(["--rota-write-through"])).keep_host_copy is True


CONFIG = RotaConfig(ttft_slo_s=2.0, tbt_slo_s=0.2)


@pytest.mark.parametrize("custom_params", [None, {}, "ttft_slo=1", [("ttft_slo", 1)],
                                           {"ttft_slo": None, "tbt_slo": None},
                                           {"priority_class": "gold"}])
def test_request_slo_defaults_to_the_server(custom_params):
    assert parse_request_slo(custom_params, CONFIG) == RequestSlo(2.0, 0.2)


@pytest.mark.parametrize("custom_params,expected", [
    ({"ttft_slo": 0.25, "tbt_slo": 0.05}, (0.25, 0.05)),
    ({"ttft_slo": 0.5}, (0.5, 0.2)),
    ({"tbt_slo": 0.01}, (2.0, 0.01)),
    ({"ttft_slo": 3, "other": "ignored"}, (3.0, 0.2)),
])
def test_request_slo_overrides_each_field(custom_params, expected):
    slo = parse_request_slo(custom_params, CONFIG)
    assert (slo.ttft_s, slo.tbt_s) == expected
    assert isinstance(slo.ttft_s, float) and isinstance(slo.tbt_s, float)


@pytest.mark.parametrize("key", ["ttft_slo", "tbt_slo"])
@pytest.mark.parametrize("value", [True, False, "0.5", [0.5], 0, -1, -0.5, math.inf, math.nan,
                                   10**400])
def test_bad_request_slo_is_a_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"custom_params.{key} "):
        parse_request_slo({key: value}, CONFIG)


def test_request_slo_is_frozen():
    slo = parse_request_slo(None, CONFIG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        slo.ttft_s = 1.0  # type: ignore[misc]
