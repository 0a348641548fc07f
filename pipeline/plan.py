"""Planning: recipe → ordered stage specs with their keys. Pure apart from
reading recipe files and hashing sources (through the stat cache).

A stage whose sources are not on this machine (a model that was never
downloaded) still plans: its key uses a placeholder and the spec carries the
error the stage will report when asked to run.
"""
from __future__ import annotations

import graphlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KilnError
from .hashing import StatCache
from .keys import compute_key, key_material
from .recipe import Recipe
from .stage import Stage
from .tools import fingerprints


@dataclass(frozen=True)
class StageSpec:
    stage: str
    recipe: str
    key: str
    material: dict[str, Any]
    inputs: dict[str, str]        # input stage name → its key
    source_paths: dict[str, str]  # source name → path (not part of the key)
    resource: str
    store: Path
    workspace: Path
    blocked: str | None = None    # why this stage cannot run here

    @property
    def task_name(self) -> str:
        return f"{self.recipe}:{self.stage}"


def stage_order(recipe: Recipe) -> list[type[Stage]]:
    from . import stages  # noqa: F401  (registers stages)

    active = {n: c for n, c in Stage.registry.items() if c.applies(recipe)}
    graph: dict[str, list[str]] = {}
    for name, cls in active.items():
        deps = cls.inputs(recipe)
        missing = [d for d in deps if d not in active]
        if missing:
            raise KilnError(f"stage {name} needs {missing}, which do not apply to recipe {recipe.name}")
        graph[name] = deps
    return [active[n] for n in graphlib.TopologicalSorter(graph).static_order()]


def plan(recipe: Recipe, cache: StatCache | None = None) -> list[StageSpec]:
    settings = recipe.settings
    own_cache = cache is None
    cache = cache or StatCache(settings.artifacts / ".statcache.json")
    store = settings.store_dir(recipe.spec.store)
    keys: dict[str, str] = {}
    specs: list[StageSpec] = []
    for cls in stage_order(recipe):
        blocked = None
        try:
            source_paths = cls.sources(recipe)
            source_hashes = {n: cache.source_hash(p) for n, p in sorted(source_paths.items())}
        except (KilnError, FileNotFoundError) as e:
            blocked = str(e) if isinstance(e, KilnError) else f"{cls.name}: source not found: {e}"
            source_paths, source_hashes = {}, {"unavailable": blocked}
        inputs = {d: keys[d] for d in cls.inputs(recipe)}
        blocked = blocked or next((s.blocked for s in specs if s.stage in inputs and s.blocked), None)
        material = key_material(cls.name, cls.version, cls.params(recipe), inputs,
                                source_hashes, fingerprints(cls.tools))
        keys[cls.name] = compute_key(material)
        specs.append(StageSpec(
            stage=cls.name, recipe=recipe.name, key=keys[cls.name], material=material,
            inputs=inputs, source_paths={n: str(p) for n, p in source_paths.items()},
            resource=cls.resource, store=store,
            workspace=settings.artifacts / recipe.name / cls.name, blocked=blocked,
        ))
    if own_cache:
        cache.save()
    return specs
