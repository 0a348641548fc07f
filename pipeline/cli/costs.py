"""costs: what each stage of a recipe cost when it was built (wall, CPU, peak RSS, bytes), with
totals and the store's size. The same table is written beside the workspace after every build
(`artifacts/<recipe>/costs.md`: measurements, never shipped in the bundle)."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from pipeline.engine.cost import human_bytes, tree_bytes
from pipeline.engine.plan import StageSpec, plan, resolve
from pipeline.engine.settings import Settings
from pipeline.engine.store import Store
from pipeline.registry import load_recipe

COSTS_PAGE = "costs.md"


def cost_rows(specs: list[StageSpec]) -> list[dict[str, Any]]:
    """One row per stage: its action record's cost, or what is missing."""
    rows = []
    for spec in specs:
        record = Store(spec.store).record(spec.key) if spec.output else None
        cost = (record or {}).get("cost")
        rows.append({"stage": spec.stage, "key": spec.key, "cost": cost, "host": (record or {}).get("host"),
                     "start": (record or {}).get("start"),
                     "state": "built" if cost else ("built before costs were recorded" if record else
                                                    f"not built ({spec.pending or 'never run'})" if spec.pending
                                                    else "not built")})
    return rows


def table(recipe: str, rows: list[dict[str, Any]], store: Path | None = None) -> str:
    lines = [f"# Stage costs: {recipe}", "",
             "| stage | wall s | CPU s | peak RSS | output | scratch | built on | when (UTC) |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        c = r["cost"]
        if not c:
            lines.append(f"| {r['stage']} | — | — | — | — | — | {r['state']} | |")
            continue
        when = datetime.datetime.fromtimestamp(r["start"], datetime.UTC).strftime("%Y-%m-%d %H:%M") if r["start"] else ""
        lines.append(f"| {r['stage']} | {c['wall_s']:.1f} | {c['cpu_s']:.1f} | {human_bytes(c['peak_rss_bytes'])} | "
                     f"{human_bytes(c['output_bytes'])} | {human_bytes(c.get('scratch_bytes', 0))} | "
                     f"{r['host']} | {when} |")
    costs = [r["cost"] for r in rows if r["cost"]]
    if costs:
        lines.append(f"| **total** ({len(costs)} of {len(rows)} stages) | {sum(c['wall_s'] for c in costs):.1f} | "
                     f"{sum(c['cpu_s'] for c in costs):.1f} | {human_bytes(max(c['peak_rss_bytes'] for c in costs))} "
                     f"(max) | {human_bytes(sum(c['output_bytes'] for c in costs))} | | | |")
    if store is not None:
        lines += ["", f"Store {store}: {human_bytes(tree_bytes(store / 'outputs'))} of outputs."]
    return "\n".join(lines) + "\n"


def costs(recipe_name: str, settings: Settings) -> str:
    specs = plan(load_recipe(recipe_name, settings))
    return table(recipe_name, cost_rows(specs), settings.store_dir())


def write_page(recipe: str, specs: list[StageSpec], settings: Settings) -> Path:
    """artifacts/<recipe>/costs.md, rewritten after a build."""
    page = settings.artifacts / recipe / COSTS_PAGE
    tmp = page.with_name(f".{COSTS_PAGE}.tmp")
    tmp.write_text(table(recipe, cost_rows(resolve(specs))))
    tmp.replace(page)
    return page


def add_parser(sub) -> None:
    p = sub.add_parser("costs", help="wall time, CPU time, peak RSS and bytes of each stage of a recipe")
    p.add_argument("recipe", nargs="?", help="recipe name (default: pyproject's default_recipe)")
    p.set_defaults(func=lambda a, s: print(costs(a.recipe or s.default_recipe, s), end="") or 0)
