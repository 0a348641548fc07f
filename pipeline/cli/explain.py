"""explain: which stages of a recipe would run and why, which would be kept by early cutoff, and
what the last build of each did."""
from __future__ import annotations

from pipeline.engine.cost import describe
from pipeline.engine.keys import causes, diff
from pipeline.engine.plan import StageSpec, plan, resolve
from pipeline.engine.runner import downstream, is_up_to_date, workspace_mark
from pipeline.engine.settings import Settings
from pipeline.engine.store import Store
from pipeline.registry import load_recipe


def _changes(store: Store, old_key: str | None, spec: StageSpec) -> list[str] | None:
    """Diff of `old_key`'s recorded material against the spec's, None when that record is gone."""
    record = store.record(old_key) if old_key else None
    return None if record is None else diff(record["material"], spec.material)


def _last_build(spec: StageSpec, store: Store) -> str:
    """'; last build: rebuilt (source changed) → same output → 4 downstream stages kept'."""
    last = workspace_mark(spec).get("last")
    if not last:
        return ""
    changes = _changes(store, last["previous_key"], spec)
    why = causes(changes) if changes else "key changed"
    if last.get("same_output"):
        n = last.get("kept_downstream", 0)
        return f"; last build: rebuilt ({why}) → same output → {n} downstream stage{'s' * (n != 1)} kept"
    return f"; last build: rebuilt ({why}) → new output"


def explain_stage(spec: StageSpec, specs: list[StageSpec], speculative: dict[str, StageSpec]) -> str:
    store = Store(spec.store)
    head = f"{spec.task_name} [{spec.key[:16]}…]"
    if spec.blocked:
        return f"{head}: cannot run here: {spec.blocked}"
    if spec.pending:
        line = f"{spec.task_name}: depends on the output of {spec.pending}, not built yet"
        if speculative[spec.stage].output is not None:
            return line + f"; kept if {spec.pending} comes out as before"
        return line + "; will run"
    if is_up_to_date(spec, specs):
        cost = describe((store.record(spec.key) or {}).get("cost"))
        return f"{head}: up to date" + (f" (cost {cost})" if cost else "") + _last_build(spec, store)
    if spec.output is not None:
        return f"{head}: store hit (built on {(store.record(spec.key) or {}).get('host', '?')}); will link it"
    mark = workspace_mark(spec)
    changes = _changes(store, mark.get("key"), spec)
    if changes is None:
        why = "never built for this recipe" if not mark else "its previous action record is gone from the store"
    else:
        why = "; ".join(changes) if changes else "key changed"
    kept = [d for d in downstream(spec.stage, specs) if speculative[d.stage].output is not None]
    cutoff = (f" (if its output comes out as before, {len(kept)} downstream stage{'s' * (len(kept) != 1)} "
              f"kept)") if kept and mark.get("output") else ""
    return f"{head}: will run: {why}{cutoff}"


def explain(recipe_name: str, settings: Settings) -> list[str]:
    specs = plan(load_recipe(recipe_name, settings))
    # early cutoff, predicted: every stage that runs comes out as its workspace holds now
    assume = {s.stage: out for s in specs if (out := workspace_mark(s).get("output"))}
    speculative = {s.stage: s for s in resolve(specs, assume)}
    return [explain_stage(s, specs, speculative) for s in specs]


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help=__doc__)
    p.add_argument("recipe", nargs="?", help="recipe name (default: pyproject's default_recipe)")
    p.set_defaults(func=lambda a, s: print("\n".join(explain(a.recipe or s.default_recipe, s))) or 0)
