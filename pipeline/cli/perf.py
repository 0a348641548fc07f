"""perf: file a phone's `genie-t2t-run --profile perf.json` with the recipe's build results
(artifacts/<recipe>/device/: <label>.json per run, device.md with every run's table)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.engine.errors import KilnError
from pipeline.qnn import genie_profile
from pipeline.registry import load_recipe


def ingest(recipe_name: str, perf: Path, label: str, artifacts: Path) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label):
        raise KilnError(f"--label {label!r}: use letters, digits, '.', '_' and '-'")
    summary = genie_profile.read(perf)
    out = artifacts / recipe_name / "device"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{label}.json.tmp"
    tmp.write_text(json.dumps({"label": label, "source": str(perf), **summary}, indent=2) + "\n")
    tmp.replace(out / f"{label}.json")
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    (out / "device.md").write_text(f"# {recipe_name}: on-device runs (Genie profiles)\n\n" + genie_profile.table(runs))
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("perf", help=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("perf_json", type=Path, metavar="perf.json")
    p.add_argument("--label", help="name of this run (default: the file's name without .json)")
    p.set_defaults(func=_main)


def _main(args, settings) -> int:
    load_recipe(args.recipe, settings)  # an unknown recipe fails with its own message
    out = ingest(args.recipe, args.perf_json, args.label or args.perf_json.stem, settings.artifacts)
    print((out / "device.md").read_text(), end="")
    return 0
