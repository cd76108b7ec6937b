"""The Grafana dashboard (monitoring/grafana/superinfer-dashboard.json) charts only real series.

Every ``superinfer:*`` name its PromQL reads must be one ``RotationMetrics`` registers (taken
from metrics.py itself, so renaming a metric fails here), every ``sglang:*`` name must be
declared in the installed SGLang's source, and the JSON must import cleanly into Grafana.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "monitoring" / "grafana" / "superinfer-dashboard.json"

_METRIC = re.compile(r"(?<![A-Za-z0-9_:])((?:superinfer|sglang):[A-Za-z0-9_:]+)")
_VAR = re.compile(r"\$(?:\{(\w+)[^}]*\}|(\w+))")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _load() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> list[dict]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def _queries(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = [(f"panel {p['id']} {p.get('title')!r}", t["expr"])
           for p in _panels(dash) for t in p.get("targets", []) if "expr" in t]
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            q = var["query"]
            out.append((f"variable {var['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def _used(dash: dict, prefix: str) -> dict[str, list[str]]:
    used: dict[str, list[str]] = {}
    for where, expr in _queries(dash):
        for name in _METRIC.findall(expr):
            if name.startswith(prefix):
                used.setdefault(name, []).append(where)
    return used


def _exported_superinfer(monkeypatch) -> set[str]:
    """Sample names RotationMetrics exposes, registered on a fresh registry."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from superinfer.adapters.sglang.metrics import RotationMetrics

    registry = prometheus_client.CollectorRegistry()
    for cls in ("Counter", "Gauge"):
        monkeypatch.setattr(prometheus_client, cls, functools.partial(
            getattr(prometheus_client, cls), registry=registry))
    RotationMetrics(enabled=True, tp_rank=0)
    names = {s.name for fam in registry.collect() for s in fam.samples}
    assert names, "RotationMetrics registered nothing"
    return names


def _sglang_source() -> str:
    """The installed SGLang's Python source, found without importing it (slow)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sglang is not installed")
    return "\n".join(p.read_text(errors="replace")
                     for root in spec.submodule_search_locations
                     for p in Path(root).rglob("*.py"))


def test_dashboard_is_grafana_json():
    dash = _load()
    assert isinstance(dash["panels"], list) and dash["panels"]
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for p in panels:
        assert {"type", "title", "gridPos"} <= p.keys(), p.get("id")
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["id"]

    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(ds) == 1 and ds[0]["query"] == "prometheus"
    ds_ref = {"type": "prometheus", "uid": "${" + ds[0]["name"] + "}"}

    # Every query goes through the datasource variable: no uid of one Grafana install.
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == ds_ref, p["id"]
        assert p["targets"], p["id"]
        for t in p["targets"]:
            assert t["datasource"] == ds_ref, (p["id"], t["refId"])
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["id"]
        assert len(p.get("description", "")) > 40, f"panel {p['id']} needs a description"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == ds_ref, v["name"]

    # Every $variable a query names is defined (Grafana's own $__* aside).
    for where, expr in _queries(dash):
        for a, b in _VAR.findall(expr):
            name = a or b
            assert name.startswith("__") or name in variables, f"{where}: ${name} undefined"


def test_superinfer_series_are_exported(monkeypatch):
    exported = _exported_superinfer(monkeypatch)
    used = _used(_load(), "superinfer:")
    assert used, "the dashboard charts no superinfer series"
    unknown = {n: w for n, w in used.items() if n not in exported}
    assert not unknown, f"not exported by RotationMetrics: {unknown}; exported: {sorted(exported)}"


def test_every_superinfer_series_is_charted(monkeypatch):
    exported = {n for n in _exported_superinfer(monkeypatch) if not n.endswith("_created")}
    missing = exported - set(_used(_load(), "superinfer:"))
    assert not missing, f"exported but on no panel: {sorted(missing)}"


def test_sglang_series_exist_in_sglang():
    source = _sglang_source()
    used = _used(_load(), "sglang:")
    assert "sglang:time_to_first_token_seconds_bucket" in used
    unknown = {}
    for name, where in used.items():
        bases = {name} | {name[: -len(s)] for s in _SUFFIXES if name.endswith(s)}
        if not any(f'"{b}"' in source for b in bases):
            unknown[name] = where
    assert not unknown, f"not declared in the installed SGLang: {unknown}"


def test_metric_regex_catches_names():
    expr = ('histogram_quantile(0.9, sum by (le) (rate(sglang:time_to_first_token_seconds_bucket'
            '{instance=~"$instance"}[$__rate_interval]))) / superinfer:rotations_out_total')
    assert _METRIC.findall(expr) == ["sglang:time_to_first_token_seconds_bucket",
                                     "superinfer:rotations_out_total"]


def test_rotation_metrics_carry_the_dp_rank(monkeypatch):
    """Every DP replica has a TP rank 0: without the DP rank, two replicas' gauges would
    overwrite each other in SGLang's multiprocess collector."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from superinfer.adapters.sglang.metrics import RotationMetrics

    registry = prometheus_client.CollectorRegistry()
    for cls in ("Counter", "Gauge"):
        monkeypatch.setattr(prometheus_client, cls, functools.partial(
            getattr(prometheus_client, cls), registry=registry))
    RotationMetrics(enabled=True, tp_rank=0, dp_rank=1)
    labels = [s.labels for fam in registry.collect() for s in fam.samples
              if s.name.startswith("superinfer:")]
    assert labels and all(lab == {"tp_rank": "0", "dp_rank": "1"} for lab in labels)
