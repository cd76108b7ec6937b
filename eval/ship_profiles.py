"""Write the decode-step profiles the package ships (src/superinfer/profiles/decode_steps.json)
from eval/models/<model>/profile_<gpu>.json (eval.profile_model's output) and each model's
config.json: the decode fit's terms and the model shape a served model is matched on
(superinfer.profiles). Run after profiling a model; a test checks the shipped file is current.

    python -m eval.ship_profiles                # rewrite the shipped file
    python -m eval.ship_profiles --check        # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from eval.lib.gpu_model import MODELS_DIR, available_profiles
from superinfer.policy.step_profile import DecodeStepProfile
from superinfer.profiles import SHIPPED, model_shape

DECODE_KEYS = ("base_s", "s_per_req", "s_per_kv_token", "s_per_expert_share", "moe", "eager_s",
               "graph_max_bs", "rms_rel")


def shipped_entry(model: str, gpu: str, models_dir: Path = MODELS_DIR) -> dict[str, Any]:
    doc = json.loads((models_dir / model / f"profile_{gpu}.json").read_text())
    config = json.loads((models_dir / model / "config.json").read_text())
    decode = {k: doc["fit"]["decode"][k] for k in DECODE_KEYS if k in doc["fit"]["decode"]}
    DecodeStepProfile.from_fit(decode)  # refuse to ship what the policy cannot read
    return {"model": model, "gpu": gpu, "gpu_name": doc.get("gpu_name"),
            "tp_size": int(doc.get("tp_size") or 1), "shape": model_shape(config),
            "decode": decode, "sglang_version": doc.get("sglang_version"),
            "date": doc.get("date"), "source": f"eval/models/{model}/profile_{gpu}.json"}


def shipped_doc(models_dir: Path = MODELS_DIR) -> dict[str, Any]:
    return {"note": "written by `python -m eval.ship_profiles`; do not edit",
            "profiles": [shipped_entry(m, g, models_dir)
                         for m, g in available_profiles(models_dir)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    ap.add_argument("--out", type=Path, default=SHIPPED)
    ap.add_argument("--check", action="store_true", help="only say whether --out is current")
    args = ap.parse_args(argv)
    doc = shipped_doc(args.models_dir)
    text = json.dumps(doc, indent=1) + "\n"
    if args.check:
        current = args.out.exists() and args.out.read_text() == text
        print(f"{args.out}: "
              + ("current" if current else "out of date: run python -m eval.ship_profiles"))
        return 0 if current else 1
    args.out.write_text(text)
    print(f"{args.out}: {len(doc['profiles'])} profiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
