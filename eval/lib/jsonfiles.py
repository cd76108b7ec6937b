"""Result files: one JSON document per run, JSON lines for per-request records, and the
command line a result records."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any


def write_json(path: str | Path, doc: Any, rows: str | None = None) -> None:
    """Write ``doc`` through a temporary file, so a run killed mid-write keeps its last result.
    ``rows``: a top-level list of ``doc`` written one compact item per line (a result of
    hundreds of points stays small and diffs point by point)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    if rows is None:
        text = json.dumps(doc, indent=1)
    else:
        fields = []
        for key, value in doc.items():
            if key == rows and value:
                items = ",\n".join("  " + json.dumps(v, separators=(",", ":")) for v in value)
                fields.append(f" {json.dumps(key)}: [\n{items}\n ]")
            else:
                fields.append(f" {json.dumps(key)}: " + json.dumps(value, indent=1)
                              .replace("\n", "\n "))
        text = "{\n" + ",\n".join(fields) + "\n}"
    tmp.write_text(text + "\n")
    tmp.replace(path)


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


COMMIT_ENV = "EVAL_COMMIT"


def source_commit() -> str | None:
    """The commit the code runs at (``-dirty`` with uncommitted changes), None outside git.
    ``$EVAL_COMMIT`` wins: the GPU machine's copy of ``.git`` can lag the tree it was sent, so
    a device command names the commit it sent (``EVAL_COMMIT=<sha> bash eval/gpu/...``)."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def command_line(module: str, argv: list[str] | None = None) -> str:
    """How a run was started, recorded in its result: the command that repeats it from the
    repository root (``argv`` defaults to this process's arguments)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
