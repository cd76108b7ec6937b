"""Merge SLO sweep results of the same trace and rates: parts run in parallel (one file per GPU),
or systems picked from several runs (each keeps where it came from).

    python -m eval.merge_slo OUT.json PART1.json PART2.json [...]
    python -m eval.merge_slo OUT.json --pick fcfs=RUN1/azure_conv.part0.json@c0d362b \\
        --pick rotasched=RUN2/azure_conv.part1.json@13862c1 [...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(parts: list[dict]) -> dict:
    base = dict(parts[0])
    base["systems"], base["skipped"], base["part_commands"] = {}, [], []
    for part in parts:
        _check_same_sweep(base, part)
        overlap = set(base["systems"]) & set(part["systems"])
        if overlap:
            raise SystemExit(f"system measured twice: {sorted(overlap)}")
        base["systems"].update(part["systems"])
        base["skipped"] += part.get("skipped", [])
        base["part_commands"].append(part["command"])
    return base


def pick(choices: list[tuple[str, dict, str]]) -> dict:
    """One result from (system, part, commit) choices: each system's series from its part, with
    the sweep_slo command that measured it, that part's date and the commit it ran at."""
    dropped = ("command", "merged_commands", "wall_s", "budget_s")
    base = {k: v for k, v in choices[0][1].items() if k not in dropped}
    base["systems"], base["skipped"] = {}, []
    for system, part, commit in choices:
        _check_same_sweep(base, part)
        if system not in part["systems"]:
            raise SystemExit(f"{system!r} is not in that part (has {sorted(part['systems'])})")
        commands = [c for c in part.get("merged_commands", [part["command"]])
                    if f"--systems {system} " in c]
        base["systems"][system] = dict(part["systems"][system], commit=commit, date=part["date"],
                                       command=commands[-1] if commands else None)
        base["skipped"] += [s for s in part.get("skipped", []) if s["system"] == system]
    return base


def _check_same_sweep(base: dict, part: dict) -> None:
    for key in ("rates", "num_requests", "trace", "cap_tokens", "ttft_slo", "tbt_slo", "seed"):
        if part.get(key) != base.get(key):
            raise SystemExit(f"parts differ in {key}: not one sweep")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("parts", type=Path, nargs="*")
    ap.add_argument("--pick", action="append", default=[], metavar="SYSTEM=PART.json@COMMIT")
    args = ap.parse_args()
    if bool(args.parts) == bool(args.pick):
        ap.error("give either parts to merge or --pick choices")
    if args.parts:
        merged = merge([json.loads(p.read_text()) for p in args.parts])
    else:
        choices = []
        for spec in args.pick:
            system, _, rest = spec.partition("=")
            path, _, commit = rest.rpartition("@")
            if not (system and path and commit):
                ap.error(f"--pick {spec!r}: expected SYSTEM=PART.json@COMMIT")
            choices.append((system, json.loads(Path(path).read_text()), commit))
        merged = pick(choices)
    args.out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"{len(merged['systems'])} systems {sorted(merged['systems'])} -> {args.out}")


if __name__ == "__main__":
    main()
