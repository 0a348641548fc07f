"""explain: which stages of a recipe would run, and which input of their key changed."""
from __future__ import annotations

from pipeline.engine.keys import diff
from pipeline.engine.plan import StageSpec, plan
from pipeline.engine.runner import is_up_to_date, workspace_key
from pipeline.engine.settings import Settings
from pipeline.engine.store import Store
from pipeline.registry import load_recipe


def explain_stage(spec: StageSpec) -> str:
    store = Store(spec.store)
    head = f"{spec.task_name} [{spec.key[:16]}…]"
    if spec.blocked:
        return f"{head}: cannot run here: {spec.blocked}"
    if is_up_to_date(spec):
        return f"{head}: up to date"
    if store.has(spec.key):
        return f"{head}: store hit (built {store.meta(spec.key).get('host', '?')}); will link it into the workspace"
    previous = workspace_key(spec)
    if previous is None or not store.has(previous):
        why = "never built for this recipe" if previous is None else "previous entry is gone from the store"
        return f"{head}: will run: {why}"
    changes = diff(store.meta(previous)["material"], spec.material)
    return f"{head}: will run: " + ("; ".join(changes) if changes else "key changed")


def explain(recipe_name: str, settings: Settings) -> list[str]:
    return [explain_stage(s) for s in plan(load_recipe(recipe_name, settings))]


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help=__doc__)
    p.add_argument("recipe", nargs="?", help="recipe name (default: pyproject's default_recipe)")
    p.set_defaults(func=lambda a, s: print("\n".join(explain(a.recipe or s.default_recipe, s))) or 0)
