"""The e2e result document: its skeleton, the headline fields (``passed`` and what it rests on)
and the summary table printed at the end."""

from __future__ import annotations

import argparse
import resource
import shlex
from datetime import datetime, timezone
from typing import Any

from eval.e2e import rotator_stats as rs
from eval.e2e.servers import Server, ServerPlan
from eval.lib.jsonfiles import command_line
from eval.lib.traces import RequestSpec

Result = dict[str, Any]
ROTATION_NOTE = ("rotations_by_rank 'source': 'idle' when the phase has an idle record (all "
                 "fields), 'stats' when it has none (the server went on to the next phase without "
                 "logging one): rotations_out then comes from the cumulative stats records (every "
                 "5 s, so a lower bound) and per-request counts, aborts and pools are null; "
                 "headline sums with any null are null.")
LEAK_NOTE = ("leaked_*_pages: device pages of the server's --page-size tokens, host-tier pages of "
             "the rotator's host page (its start record: 16 tokens, or --page-size on the direct "
             "path); leaked_*_tokens: the same in tokens. The worst (largest magnitude) over "
             "every rotasched server's last idle record: after the soak if it was soaked, else "
             "after the burst (leak_source).")
TP2_NOTE = ("rota_tp2 is compared with baseline_tp2: dummy weights are seeded per shard and TP "
            "reductions differ, so TP=1 output ids are no reference for TP=2.")


def final_leaks(result: Result) -> dict[str, dict[str, Any] | None]:
    """Per rotasched server: what its last idle record says is held (after the soak if it was
    soaked, else after the burst), per TP rank; None when unknown (never idle, no record)."""
    corr = {n: c for n, c in result["correctness"].items() if "reference" in c}
    out: dict[str, dict[str, Any] | None] = {}
    for name in [*corr, *(n for n in result["soak"] if n not in corr)]:
        soak = result["soak"].get(name)
        if soak is not None:
            out[name] = soak["leaks"] or None
        else:
            c = corr[name]
            out[name] = rs.idle_leaks(c["rotations_by_rank"]) if c["idle_reached"] else None
    return out


def _worst(values: list[int]) -> int:
    return max(values, key=abs)


def _total(values: list[int | None]) -> int | None:
    """The sum, or None when any is unknown."""
    return None if any(v is None for v in values) else sum(values)


def overall(result: Result) -> Result:
    """The headline fields from the per-phase entries."""
    rota = {n: c for n, c in result["correctness"].items() if "reference" in c}
    rot = [c.get("rotations") or {} for c in rota.values()]
    cmps = [c.get("compare") for c in rota.values()]
    equal = bool(cmps) and all(c is not None and 0 < c["n_compared"] == c["n_equal"] for c in cmps)
    controls = [c["control_reversed"] for c in result["correctness"].values()
                if "control_reversed" in c]
    leaks = final_leaks(result)
    known = [v for lk in leaks.values() if lk for v in lk.values()]
    unknown = not known or any(lk is None for lk in leaks.values())
    tp2 = rota.get("rota_tp2")
    tp2_ran = bool(tp2 and tp2.get("compare") and tp2["compare"]["n_compared"] > 0)
    tp2_same = (result.get("tp2") or {}).get("identical")
    checks_ok = bool(result["checks"]) and all(c["passed"] for c in result["checks"].values())
    metrics_ok = bool(result["metrics"]) and all(m["ok"] for m in result["metrics"].values())
    head: Result = {
        "rotations": sum(r.get("rotations_out", 0) for r in rot),
        "rotated_requests": _total([r.get("rotated_reqs", 0) for r in rot]),
        "multi_rotated_requests": _total([r.get("multi_rotated_reqs", 0) for r in rot]),
        "rotations_source": {n: r.get("source") for n, r in zip(rota, rot, strict=False)},
        "soak_aborted_while_rotated": _total([
            rs.first_rank(e.get("rotations_by_rank") or {}).get("aborted_while_rotated", 0)
            for e in result["soak"].values()]),
        "outputs_equal": equal,
        "outputs_compared": {n: f"{c['n_equal']}/{c['n_compared']} of {c['n']}" if c else None
                             for n, c in zip(rota, cmps, strict=False)},
        "control_outputs_equal": (all(c["n_equal"] == c["n_compared"] for c in controls)
                                  if controls else None),
        "leak_source": {n: "soak" if n in result["soak"] else "correctness" for n in leaks},
        "tp2_ran": tp2_ran,
        "tp2_identical_decisions": tp2_same,
        "bad_slo_status": {n: c["bad_slo"]["status"] for n, c in result["checks"].items()},
        "checks_ok": checks_ok,
        "metrics_ok": metrics_ok,
    }
    for key in ("device_pages", "host_pages", "device_tokens", "host_tokens", "table"):
        name = "leaked_table_entries" if key == "table" else f"leaked_{key}"
        head[name] = None if unknown else _worst([v[key] for v in known])
    no_leaks = not unknown and all(v["clean"] for v in known)
    head["passed"] = (equal and head["rotations"] > 0 and no_leaks and checks_ok and metrics_ok
                      and (not tp2_ran or tp2_same is True))
    return head


def new_result(args: argparse.Namespace, gpus: list[str], base_tokens: int,
               burst: list[RequestSpec], plans: list[ServerPlan],
               skipped: list[dict[str, str]]) -> Result:
    return {
        "command": command_line("eval.e2e_rotation"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpus, "deterministic_requested": args.deterministic, "budget_s": args.budget,
        "settings": {"trace": str(args.trace), "model_path": str(args.model_path),
                     "burst_requests": len(burst),
                     "burst_tokens": sum(s.prompt_len + s.output_len for s in burst),
                     "max_prompt": args.max_prompt,
                     "output_range": [args.min_output, args.max_output],
                     "cap_tokens": args.cap, "baseline_tokens": base_tokens,
                     "host_kv_gb": args.host_kv_gb, "mem_fraction_static": args.mem_fraction_static,
                     "soak_rate": args.soak_rate, "soak_num": args.soak_num,
                     "soak_seconds": args.soak_seconds, "abort_frac": args.abort_frac,
                     "abort_stall_s": args.abort_stall_s,
                     "rota_extra": args.rota_extra, "server_extra": args.server_extra,
                     "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)},
        "notes": [
            LEAK_NOTE, TP2_NOTE,
            (f"baselines hold the whole burst ({base_tokens} tokens) so they never retract; "
             "'retracted' counts requests SGLang itself retracted (meta_info.num_retractions)."),
            ROTATION_NOTE,
        ],
        "servers": {p.name: {"gpus": list(p.gpus), "flags": list(p.flags), "state": "not started"}
                    for p in plans},
        "correctness": {}, "soak": {}, "checks": {}, "metrics": {}, "tp2": None,
        "skipped": list(skipped),
    }


def server_entries(servers: list[Server]) -> dict[str, Result]:
    out = {}
    for s in servers:
        ranks = rs.rotator_ranks(s.read_log()) if s.plan.rotasched else None
        out[s.name] = {"state": s.state, "gpus": list(s.plan.gpus), "port": s.port,
                       "deterministic": s.deterministic, "startup_s": s.startup_s,
                       "command": shlex.join(s.cmd), "log": str(s.log_path), "attempts": s.attempts,
                       "alive_at_end": s.alive(), "rotator_ranks": ranks}
    return out


def summary_table(result: Result) -> str:
    head = ("server", "state", "det", "complete", "equal", "rot_out", "rot_reqs", "multi", "max",
            "leak dev/host/table", "bad SLO", "metrics")
    rows = [head]
    leaks = final_leaks(result)
    for name, srv in result["servers"].items():
        c = result["correctness"].get(name, {})
        cmp_, rot = c.get("compare"), c.get("rotations")
        held = leaks.get(name)
        leak = "/".join(str(_worst([v[k] for v in held.values()]))
                        for k in ("device_tokens", "host_tokens", "table")) if held else "-"
        chk, met = result["checks"].get(name), result["metrics"].get(name)
        rows.append((name, srv.get("state", "?"), "y" if srv.get("deterministic") else "n",
                     f"{c['complete']}/{c['n']}" if c else "-",
                     f"{cmp_['n_equal']}/{cmp_['n_compared']}" if cmp_ else "-",
                     *(("?" if rot[k] is None else str(rot[k])) if rot else "-"
                       for k in ("rotations_out", "rotated_reqs", "multi_rotated_reqs",
                                 "max_per_req")),
                     leak, str(chk["bad_slo"]["status"]) if chk else "-",
                     ("ok" if met["ok"] else "FAIL") if met else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) for r in rows]
    keys = ("rotations", "rotated_requests", "multi_rotated_requests", "outputs_equal",
            "control_outputs_equal", "leaked_device_pages", "leaked_host_pages", "tp2_ran",
            "tp2_identical_decisions", "passed")
    lines.append(", ".join(f"{k}={result.get(k)}" for k in keys))
    lines += [f"skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines)
