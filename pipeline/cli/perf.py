"""perf: file a device run with the recipe's build results: a phone's `genie-t2t-run --profile
perf.json` or a board's `llama-bench -o json` output (artifacts/<recipe>/device/: <label>.json
per run, device.md with every run's table; the report's build page lists them). For llama-bench
it prints the `eval.latency` lines that put the measured speeds into the recipe."""
from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.engine.errors import KilnError
from pipeline.llamacpp import bench_json
from pipeline.qnn import genie_profile
from pipeline.registry import load_recipe


def ingest(recipe_name: str, perf: Path, label: str, artifacts: Path) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label):
        raise KilnError(f"--label {label!r}: use letters, digits, '.', '_' and '-'")
    with perf.open("rb") as f:
        llama_bench = f.read(1024).lstrip().startswith(b"[")  # a JSON list; a Genie profile is an object
    summary = bench_json.read(perf) if llama_bench else genie_profile.read(perf)
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
    label = args.label or args.perf_json.stem
    out = ingest(args.recipe, args.perf_json, label, settings.artifacts)
    print((out / "device.md").read_text(), end="")
    run = json.loads((out / f"{label}.json").read_text())
    if run.get("kind") == "llama-bench":
        speeds = ", ".join(f"{q['type']}: {q['generated_tokens_per_s']:.3g}" for q in run["queries"])
        source = json.dumps(f"{label}: llama-bench on {run['queries'][0]['cpu'] or 'the device'}")  # a quoted YAML scalar
        print(f"\nTo draw accuracy at equal latency from this run, put in recipes/{args.recipe}.yaml:\n"
              f"eval:\n  latency:\n    source: {source}\n    tokens_per_s: {{{speeds}}}")
    return 0
