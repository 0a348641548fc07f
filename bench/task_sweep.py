"""The full task-accuracy sweep of a recipe (its `eval.tasks`), built through doit like any stage,
then its figures printed: accuracy with 95% Wilson intervals and mean reply length per variant,
prompt and budget; with `eval.latency`, the same accuracies at equal generation time.

Run: .venv/bin/python bench/task_sweep.py [--recipe smollm2_135m_rk3568]
(~30 min on 2 cores for the shipped rk3568 recipe: 100 problems x 3 quant types x 6 replies).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pipeline.engine.plan import plan, resolve  # noqa: E402
from pipeline.engine.settings import Settings  # noqa: E402
from pipeline.engine.store import Store  # noqa: E402
from pipeline.evaluation.page import budget_rows  # noqa: E402
from pipeline.evaluation.tasks import latency_curves  # noqa: E402
from pipeline.registry import load_recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="smollm2_135m_rk3568")
    args = parser.parse_args()
    settings = Settings.from_env()
    recipe = load_recipe(args.recipe, settings)
    if recipe.spec.eval.tasks is None:
        sys.exit(f"{args.recipe} has no eval.tasks")
    nodes = [s.task_name for s in plan(recipe) if s.name.endswith(".tasks")]
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "doit", f"recipe={args.recipe}", *nodes], cwd=ROOT, check=True)
    print(f"\nsweep built in {time.monotonic() - start:.0f} s ({len(nodes)} stages)\n")
    results = {}
    for spec in resolve(plan(recipe)):
        if spec.name.endswith(".tasks"):
            r = json.loads((Store(spec.store).out(spec.output or "") / "tasks.json").read_text())
            results[r["type"]] = r
    first = next(iter(results.values()))
    print(f"{first['label']}: {first['problems']} problems; {first['runner']}")
    print("| variant | prompt | " + " | ".join(f"{b} tokens" for b in first["budgets"]) + " |")
    print("|---|---|" + "---:|" * len(first["budgets"]))
    for name, r in results.items():
        for prompt, rows in r["accuracy"].items():
            cells = [f"{100 * x['accuracy']:.0f}% [{100 * x['ci95'][0]:.0f}, {100 * x['ci95'][1]:.0f}] "
                     f"({x['mean_tokens']:.0f} tok)" for _, x in budget_rows(rows)]
            print(f"| {name} | {prompt} | " + " | ".join(cells) + " |")
    latency = recipe.spec.eval.latency
    if latency:
        print(f"\nAt equal latency ({latency.source}):")
        for prompt in first["prompts"]:
            curves, unit, missing = latency_curves(results, prompt, latency.model_dump(mode="json"))
            points = "; ".join(f"{t}: " + ", ".join(f"{x:.0f}→{100 * a:.0f}%" for x, a, _, _ in sorted(p))
                               for t, p in curves.items())
            print(f"- {prompt} ({unit}): {points}" + (f" (no speed for {', '.join(missing)})" if missing else ""))


if __name__ == "__main__":
    main()
