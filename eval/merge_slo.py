"""Merge SLO sweep results of the same trace and rates run in parallel (one file per GPU).

    python3 eval/merge_slo.py OUT.json PART1.json PART2.json [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def merge(parts: list[dict]) -> dict:
    base = dict(parts[0])
    base["systems"], base["skipped"], base["part_commands"] = {}, [], []
    for part in parts:
        if part["rates"] != base["rates"] or part["num_requests"] != base["num_requests"]:
            raise SystemExit("parts differ in rates or request counts: not one sweep")
        overlap = set(base["systems"]) & set(part["systems"])
        if overlap:
            raise SystemExit(f"system measured twice: {sorted(overlap)}")
        base["systems"].update(part["systems"])
        base["skipped"] += part.get("skipped", [])
        base["part_commands"].append(part["command"])
    return base


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out, *paths = sys.argv[1:]
    merged = merge([json.loads(Path(p).read_text()) for p in paths])
    Path(out).write_text(json.dumps(merged, indent=2))
    print(f"merged {len(paths)} parts, systems {sorted(merged['systems'])} -> {out}")


if __name__ == "__main__":
    main()
