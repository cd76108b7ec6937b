"""Rebuild a finished e2e run's result from its --out-dir, without starting a server: after a
fix to the analysis, a run already paid for need not be repeated.

Each phase's window comes from progress.log (time of day only) and the server logs (dated
lines); the rotator's records inside a window give that phase's rotations and leaks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from eval.e2e import rotator_stats as rs
from eval.e2e.phases import correctness_entry, soak_entry
from eval.e2e.report import ROTATION_NOTE, overall
from eval.e2e.servers import Server, ServerPlan
from eval.lib.jsonfiles import read_jsonl

LOG_TIME_RE = re.compile(rb"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")  # SGLang's log prefix
PROGRESS_RE = re.compile(r"\[(\d\d:\d\d:\d\d) \+\s*-?\d+s\] (.*)")  # eval.lib.progress's prefix
Result = dict[str, Any]


def log_time(line: bytes) -> datetime | None:
    m = LOG_TIME_RE.match(line)
    return datetime.strptime(m.group(1).decode(), "%Y-%m-%d %H:%M:%S") if m else None


def first_log_time(path: Path) -> datetime | None:
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return next((t for t in map(log_time, f) if t is not None), None)


def window_offsets(data: bytes, start: datetime, end: datetime) -> tuple[int, int]:
    """Byte offsets [offset, log_end) of a server log's lines stamped in [start, end] (whole
    seconds; a line without a stamp goes with the one before it)."""
    pos, when, first, last = 0, None, None, 0
    for line in data.splitlines(keepends=True):
        when = log_time(line) or when
        if first is None and when is not None and when >= start:
            first = pos
        pos += len(line)
        if when is not None and when <= end:
            last = pos
    first = pos if first is None else first
    return first, max(first, last)


def progress_events(text: str, anchor: datetime) -> list[tuple[datetime, str]]:
    """progress.log's lines as (time, message). They carry the time of day only: the first goes
    on the day that puts it nearest ``anchor``, each later one on its predecessor's day (the next
    day when its time of day is earlier)."""
    out: list[tuple[datetime, str]] = []
    for line in text.splitlines():
        m = PROGRESS_RE.match(line)
        if m is None:
            continue
        clock = datetime.strptime(m.group(1), "%H:%M:%S").time()
        if out:
            when = datetime.combine(out[-1][0].date(), clock)
            when += timedelta(days=1) if when < out[-1][0] else timedelta()
        else:
            when = min((datetime.combine(anchor.date() + timedelta(days=d), clock)
                        for d in (-1, 0, 1)), key=lambda w: abs(w - anchor))
        out.append((when, m.group(2)))
    return out


def phase_window(events: list[tuple[datetime, str]], phase: str,
                 name: str) -> tuple[datetime, datetime] | None:
    """A server's window in a phase: from the phase's first progress line to the line on that
    server's result (logged once every server of the phase is done and idle, or given up)."""
    start = next((t for t, msg in events if msg.startswith(f"{phase}: ")), None)
    end = next((t for t, msg in events if msg.startswith(f"{phase}: {name}: ")), None)
    return None if start is None or end is None else (start, end)


def original_result(run_dir: Path) -> Path:
    """The run's own result JSON in its --out-dir: e2e_h200.json, else the only one there."""
    default = run_dir / "e2e_h200.json"
    if default.exists():
        return default
    found = [p for p in sorted(run_dir.glob("*.json"))
             if {"command", "correctness"} <= set(json.loads(p.read_text()))]
    if len(found) != 1:
        raise SystemExit(f"{run_dir}: no single result JSON (found {[p.name for p in found]})")
    return found[0]


def reanalyze(run_dir: Path, command: str,
              plans_of: Callable[[Result], list[ServerPlan]]) -> Result:
    """The result JSON of a finished run, rebuilt from its --out-dir: each phase's rotations
    (server windows from progress.log, records from the server logs), the output comparisons
    (correctness_*.jsonl), the soak counts and leaks (soak_*.jsonl and the soak's idle record),
    TP=2 rank agreement and the headline fields. What the directory does not hold comes from the
    run's own JSON: command, date, GPUs, settings, servers, whether a server went idle, the
    reversed-order controls, the post-soak checks and the metrics. ``plans_of`` gives the run's
    server plans from its JSON."""
    orig = json.loads(original_result(run_dir).read_text())
    servers = []
    for p in plans_of(orig):
        srv = orig["servers"][p.name]
        s = Server(p, srv.get("port", 0), run_dir, bool(srv.get("deterministic")),
                   port=srv.get("port", 0), state=srv.get("state", "?"))
        s.log_path = run_dir / Path(srv.get("log") or f"server_{p.name}.log").name
        servers.append(s)
    stamps = [t for t in (first_log_time(s.log_path) for s in servers) if t is not None]
    anchor = min(stamps) if stamps else datetime.fromisoformat(orig["date"]).replace(tzinfo=None)
    events = progress_events((run_dir / "progress.log").read_text(), anchor)
    result = dict(orig, correctness=dict(orig["correctness"]), soak=dict(orig["soak"]))
    windows: dict[str, dict[str, list[str]]] = {"correctness": {}, "soak": {}}
    outs: dict[str, dict[str, Result]] = {"correctness": {}, "soak": {}}
    for phase, out in outs.items():
        for s in servers:
            records = run_dir / f"{phase}_{s.name}.jsonl"
            window = phase_window(events, phase, s.name)
            old = orig[phase].get(s.name)
            if old is None or window is None or not records.exists() or not s.log_path.exists():
                continue
            offset, log_end = window_offsets(s.log_path.read_bytes(), *window)
            out[s.name] = {"offset": offset, "log_end": log_end, "records": read_jsonl(records),
                           "idle": old["idle_reached"]}
            windows[phase][s.name] = [t.isoformat(sep=" ") for t in window]
    for s in servers:
        if s.name in outs["correctness"]:
            entry = correctness_entry(s, outs["correctness"])
            if "control_reversed" in orig["correctness"][s.name]:  # its records were not saved
                entry["control_reversed"] = orig["correctness"][s.name]["control_reversed"]
            result["correctness"][s.name] = entry
        if s.name in outs["soak"]:
            result["soak"][s.name] = soak_entry(s, outs["soak"][s.name])
        if s.name == "rota_tp2" and orig.get("tp2") is not None and s.log_path.exists():
            result["tp2"] = rs.ranks_agree(rs.rotation_records(s.read_log()))
    if ROTATION_NOTE not in result.get("notes", []):
        result["notes"] = [*result.get("notes", []), ROTATION_NOTE]
    result["reanalyzed"] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "command": command, "run_dir": str(run_dir), "windows": windows}
    result.update(overall(result))
    return result
