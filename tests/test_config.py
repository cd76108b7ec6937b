"""One config surface: flags generated from RotaConfig's fields, one check per setting shared by
argparse and RotaConfig, and per-request SLOs parsed once."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
from sglang.srt.server_args import ServerArgs

from superinfer.adapters.sglang import compat
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
    "--rota-pacing-cost-share": ("pacing_cost_share", 0.03),
    "--rota-keep-host-copy": ("keep_host_copy", False),
    "--rota-write-through": ("write_through", False),
    "--rota-host-numa-node": ("host_numa_node", "auto"),
    "--rota-disable-prefill-pacing": ("prefill_pacing", False),
    "--rota-request-slo": ("request_slo", "clamp"),
    "--rota-min-request-slo-ratio": ("min_request_slo_ratio", 1.0),
    "--rota-monitor": ("monitor", False),
    "--rota-decode-profile": ("decode_profile", "auto"),
}
INTERNAL = {"away_margin", "fewest_late", "early_returns", "reserve_window_s", "reserve_max_frac",
            "late_last", "late_wait_slos", "lvf_budget_tokens", "min_prefill_chunk",
            "pacing_step_share"}


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
    fields = set(compat.server_args_fields(ServerArgs))
    defaults = RotaConfig()
    assert {name for name in actions if name.startswith("--rota-")} == set(FLAGS)
    for flag, (field, server_default) in FLAGS.items():
        assert dest(flag) in fields
        action = actions[flag]
        assert action.dest == dest(flag) and action.default == server_default
        assert compat.server_args_default(ServerArgs, dest(flag)) == server_default
        assert action.help.startswith("rotasched: ") and len(action.help) > 20
        # The one inverted flag turns a default-on setting off.
        inverted = flag == "--rota-disable-prefill-pacing"
        assert getattr(defaults, field) == ((not server_default) if inverted else server_default)
        if isinstance(server_default, bool):
            assert server_default is False, f"{flag} is store_true: it can only turn on"
    assert actions["--rota-policy"].choices == ["slo", "lvf"]
    assert actions["--rota-mover"].choices == ["auto", "torch", "staging", "zerocopy", "direct"]
    assert actions["--rota-request-slo"].choices == ["clamp", "reject", "off"]
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
    ("--rota-host-numa-node", "-1", "must be 'auto', 'off' or a node number"),
    ("--rota-host-numa-node", "1.5", "must be 'auto', 'off' or a node number"),
    ("--rota-min-request-slo-ratio", "0", "must be in (0, 1]"),
    ("--rota-min-request-slo-ratio", "1.5", "must be in (0, 1]"),
    ("--rota-min-request-slo-ratio", "-0.5", "must be in (0, 1]"),
    ("--rota-min-request-slo-ratio", "nan", "must be in (0, 1]"),
    ("--rota-min-request-slo-ratio", "half", "expects a number"),
    ("--rota-decode-profile", "/no/such/profile.json",
     "must be 'auto', 'off' or the path of an existing file"),
])
def test_bad_flag_values_exit_2_naming_the_flag(flag, value, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse([flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {flag} {needle}" in err


@pytest.mark.parametrize("flag", ["--rota-policy", "--rota-mover", "--rota-request-slo"])
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
                      rota_host_numa_node="1", rota_disable_prefill_pacing=True,
                      rota_request_slo="reject", rota_min_request_slo_ratio=0.5)
    assert rota_config(args) == RotaConfig(
        ttft_slo_s=0.5, tbt_slo_s=0.05, host_kv_gb=2.0, policy="lvf", mover="direct",
        slack_margin=3.0, link_share=0.25, keep_host_copy=True, write_through=False,
        host_numa_node="1", prefill_pacing=False, request_slo="reject",
        min_request_slo_ratio=0.5)
    assert rota_config(ServerArgs(model_path="dummy", device="cpu")) == RotaConfig()
    assert rota_config(parse([])) == RotaConfig()
    assert rota_config(parse(["--rota-mover", "staging"])).mover == "staging"
    slo_flags = parse(["--rota-request-slo", "off", "--rota-min-request-slo-ratio", "0.25"])
    assert (rota_config(slo_flags).request_slo, rota_config(slo_flags).min_request_slo_ratio) == (
        "off", 0.25)


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
    ("host_numa_node", "-1", "--rota-host-numa-node must be 'auto', 'off' or a node number"),
    ("host_numa_node", 1, "--rota-host-numa-node expects 'auto', 'off' or a node number"),
    ("request_slo", "deny", "--rota-request-slo must be one of"),
    ("min_request_slo_ratio", 0, "--rota-min-request-slo-ratio must be in (0, 1]"),
    ("min_request_slo_ratio", 1.01, "--rota-min-request-slo-ratio must be in (0, 1]"),
    # Settings with no flag are named by their field, never by a flag that does not exist.
    ("reserve_window_s", -0.1, "reserve_window_s must be a finite number >= 0"),
    ("reserve_max_frac", 1.0, "reserve_max_frac must be in [0, 1)"),
    ("lvf_budget_tokens", -1, "lvf_budget_tokens must be >= 0"),
    ("min_prefill_chunk", 0, "min_prefill_chunk must be >= 1"),
    ("pacing_step_share", 0.0, "pacing_step_share must be a positive finite number"),
])
def test_config_checks_name_the_setting(field, value, needle):
    with pytest.raises(ConfigError) as exc:
        RotaConfig(**{field: value})
    assert needle in str(exc.value)
    if field in INTERNAL:
        assert "--" not in str(exc.value)


def test_boundaries_that_are_allowed():
    assert RotaConfig(link_share=1.0).link_share == 1.0
    assert RotaConfig(min_request_slo_ratio=1).min_request_slo_ratio == 1.0
    assert RotaConfig(min_request_slo_ratio=1e-6).min_request_slo_ratio == 1e-6
    assert RotaConfig(reserve_window_s=0.0, reserve_max_frac=0.0, lvf_budget_tokens=0,
                      host_numa_node="0", min_prefill_chunk=1).host_numa_node == "0"
    assert RotaConfig(ttft_slo_s=2).ttft_slo_s == 2  # ints are numbers of seconds too


def test_write_through_implies_keep_host_copy():
    assert RotaConfig(write_through=True).keep_host_copy is True
    assert RotaConfig(write_through=True, keep_host_copy=False).keep_host_copy is True
    kept = RotaConfig(keep_host_copy=True)
    assert kept.keep_host_copy is True and kept.write_through is False
    assert RotaConfig().keep_host_copy is False
    assert not hasattr(RotaConfig(), "keeps_host_copies")
    assert rota_config(parse(["--rota-write-through"])).keep_host_copy is True


CONFIG = RotaConfig(ttft_slo_s=2.0, tbt_slo_s=0.2)  # the defaults: clamp at ratio 1.0
MODES = ("clamp", "reject", "off")


def config(mode: str = "clamp", ratio: float = 1.0) -> RotaConfig:
    return dataclasses.replace(CONFIG, request_slo=mode, min_request_slo_ratio=ratio)


def test_the_default_lets_clients_only_loosen_their_slos():
    """No priority escalation unless the operator allows it (SGLang's priorities need
    --enable-priority-scheduling): a tighter override is raised to the server's SLO."""
    assert (RotaConfig().request_slo, RotaConfig().min_request_slo_ratio) == ("clamp", 1.0)
    assert parse_request_slo({"ttft_slo": 0.001, "tbt_slo": 1e-6}, CONFIG) == RequestSlo(2.0, 0.2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("custom_params", [None, {}, "ttft_slo=1", [("ttft_slo", 1)],
                                           {"ttft_slo": None, "tbt_slo": None},
                                           {"priority_class": "gold"}])
def test_request_slo_defaults_to_the_server(custom_params, mode):
    assert parse_request_slo(custom_params, config(mode)) == RequestSlo(2.0, 0.2)


@pytest.mark.parametrize("mode", ["clamp", "reject"])
@pytest.mark.parametrize("custom_params,expected", [
    ({"ttft_slo": 0.25, "tbt_slo": 0.05}, (0.25, 0.05)),
    ({"ttft_slo": 0.5}, (0.5, 0.2)),
    ({"tbt_slo": 0.02}, (2.0, 0.02)),  # exactly the floor
    ({"ttft_slo": 3, "other": "ignored"}, (3.0, 0.2)),
])
def test_request_slo_overrides_each_field_above_the_floor(custom_params, expected, mode):
    slo = parse_request_slo(custom_params, config(mode, ratio=0.1))
    assert (slo.ttft_s, slo.tbt_s) == expected
    assert isinstance(slo.ttft_s, float) and isinstance(slo.tbt_s, float)


@pytest.mark.parametrize("mode", ["clamp", "reject"])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.01])
def test_looser_and_equal_values_are_always_kept(mode, ratio):
    cfg = config(mode, ratio)
    assert parse_request_slo({"ttft_slo": 2.0, "tbt_slo": 0.2}, cfg) == RequestSlo(2.0, 0.2)
    assert parse_request_slo({"ttft_slo": 60, "tbt_slo": 1.5}, cfg) == RequestSlo(60.0, 1.5)
    assert parse_request_slo({"ttft_slo": 1e300}, cfg) == RequestSlo(1e300, 0.2)


@pytest.mark.parametrize("custom_params,ratio,expected", [
    ({"ttft_slo": 0.001}, 1.0, (2.0, 0.2)),
    ({"tbt_slo": 1e-9}, 1.0, (2.0, 0.2)),
    ({"ttft_slo": 0.25, "tbt_slo": 0.15}, 0.5, (1.0, 0.15)),  # each field on its own
    ({"ttft_slo": 5.0, "tbt_slo": 0.001}, 0.5, (5.0, 0.1)),
    ({"ttft_slo": 0.5, "tbt_slo": 0.05}, 0.25, (0.5, 0.05)),  # at the floor: kept
])
def test_clamp_raises_tighter_values_to_the_floor(custom_params, ratio, expected):
    slo = parse_request_slo(custom_params, config("clamp", ratio))
    assert (slo.ttft_s, slo.tbt_s) == pytest.approx(expected)


def test_the_floor_is_not_missed_by_rounding():
    cfg = RotaConfig(tbt_slo_s=0.1, min_request_slo_ratio=0.9, request_slo="reject")
    assert 0.9 * 0.1 > 0.09  # the floor as computed is above what the client wrote
    assert parse_request_slo({"tbt_slo": 0.09}, cfg).tbt_s == 0.09
    clamp = dataclasses.replace(cfg, request_slo="clamp")
    assert parse_request_slo({"tbt_slo": 0.09}, clamp).tbt_s == 0.09


@pytest.mark.parametrize("key,value,ratio,needles", [
    ("ttft_slo", 0.001, 1.0, ["custom_params.ttft_slo 0.001 ", "the floor is 2 s",
                              "--rota-min-request-slo-ratio 1 x --rota-ttft-slo 2",
                              "looser values are allowed"]),
    ("ttft_slo", 0.25, 0.5, ["custom_params.ttft_slo 0.25 ", "the floor is 1 s",
                             "--rota-min-request-slo-ratio 0.5 x --rota-ttft-slo 2"]),
    ("tbt_slo", 0.05, 0.5, ["custom_params.tbt_slo 0.05 ", "the floor is 0.1 s",
                            "--rota-min-request-slo-ratio 0.5 x --rota-tbt-slo 0.2"]),
])
def test_reject_names_the_key_the_value_and_the_floor(key, value, ratio, needles):
    with pytest.raises(ConfigError) as exc:
        parse_request_slo({key: value}, config("reject", ratio))
    for needle in needles:
        assert needle in str(exc.value)


def test_reject_refuses_the_whole_request_if_one_field_is_too_tight():
    with pytest.raises(ConfigError, match="custom_params.tbt_slo"):
        parse_request_slo({"ttft_slo": 10.0, "tbt_slo": 0.01}, config("reject"))


@pytest.mark.parametrize("custom_params", [{"ttft_slo": 0.001, "tbt_slo": 0.001},
                                           {"ttft_slo": 60.0, "tbt_slo": 5.0},
                                           {"ttft_slo": 0.5}])
def test_off_ignores_every_override(custom_params):
    assert parse_request_slo(custom_params, config("off")) == RequestSlo(2.0, 0.2)
    assert parse_request_slo(custom_params, config("off", 0.01)) == RequestSlo(2.0, 0.2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", ["ttft_slo", "tbt_slo"])
@pytest.mark.parametrize("value", [True, False, "0.5", [0.5], 0, -1, -0.5, math.inf, math.nan,
                                   10**400])
def test_bad_request_slo_is_a_config_error_naming_the_key_in_every_mode(key, value, mode):
    with pytest.raises(ConfigError, match=f"custom_params.{key} "):
        parse_request_slo({key: value}, config(mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", ["ttft_sloo", "tbt", "ttft", "TTFT_SLO", "tbt_slo_s", "ttft-slo",
                                 "tbtslo", "ttft_slo_ms"])
def test_misspelled_slo_keys_are_errors_naming_the_known_keys(key, mode):
    for params in ({key: 0.5}, {"ttft_slo": 3.0, key: 0.5}, {key: None}):
        with pytest.raises(ConfigError) as exc:
            parse_request_slo(params, config(mode))
        assert f"custom_params.{key} is not a known key" in str(exc.value)
        assert "ttft_slo and tbt_slo" in str(exc.value)


@pytest.mark.parametrize("mode", MODES)
def test_other_unknown_keys_belong_to_other_plugins(mode):
    params = {"priority_class": "gold", "slo": 0.001, "max_ttft": 0.001, "lora_tag": "x",
              3: "non-string key", "tenant": {"ttft_slo": 0.001}}
    assert parse_request_slo(params, config(mode)) == RequestSlo(2.0, 0.2)


def test_request_slo_is_frozen():
    slo = parse_request_slo(None, CONFIG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        slo.ttft_s = 1.0  # type: ignore[misc]
