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
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError
from pipeline.engine.hashing import StatCache
from pipeline.engine.keys import compute_key, key_material
from pipeline.engine.stage import Stage, node_id, recipe_nodes
from pipeline.engine.tools import fingerprints

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


@dataclass(frozen=True)
class StageSpec:
    stage: str                    # node id: "name" or "name@variant"
    name: str                     # the Stage class's name
    entry: str                    # "module:Class" the child process runs
    variant: str
    recipe: str
    key: str
    material: dict[str, Any]
    inputs: dict[str, str]        # input node id → its key
    source_paths: dict[str, str]  # source name → path (not part of the key)
    resource: str
    store: Path
    workspace: Path
    blocked: str | None = None    # why this stage cannot run here

    @property
    def task_name(self) -> str:
        return f"{self.recipe}:{self.stage}"


def stage_graph(recipe: Recipe) -> list[tuple[type[Stage], str]]:
    """(stage class, variant) for every node of the recipe, inputs first."""
    nodes = {node_id(c.name, v): (c, v) for c, v in recipe_nodes(recipe)}
    graph: dict[str, list[str]] = {}
    for nid, (cls, variant) in nodes.items():
        deps = cls.inputs(recipe, variant)
        missing = [d for d in deps if d not in nodes]
        if missing:
            raise KilnError(f"stage {nid} needs {missing}, which do not apply to recipe {recipe.name}")
        graph[nid] = deps
    return [nodes[n] for n in graphlib.TopologicalSorter(graph).static_order()]


def plan(recipe: Recipe, cache: StatCache | None = None) -> list[StageSpec]:
    settings = recipe.settings
    own_cache = cache is None
    cache = cache or StatCache(settings.artifacts / ".statcache.json")
    store = settings.store_dir()
    keys: dict[str, str] = {}
    specs: list[StageSpec] = []
    for cls, variant in stage_graph(recipe):
        nid = node_id(cls.name, variant)
        blocked = None
        try:
            source_paths = cls.sources(recipe, variant)
            source_hashes = {n: cache.source_hash(p) for n, p in sorted(source_paths.items())}
            tools = fingerprints(cls.tool_names(recipe, variant))
        except (KilnError, FileNotFoundError) as e:
            blocked = str(e) if isinstance(e, KilnError) else f"{nid}: source not found: {e}"
            source_paths, source_hashes, tools = {}, {"unavailable": blocked}, {}
        inputs = {d: keys[d] for d in cls.inputs(recipe, variant)}
        blocked = blocked or next((s.blocked for s in specs if s.stage in inputs and s.blocked), None)
        params = cls.params(recipe, variant)
        if cls.per_recipe:
            params = {**params, "recipe": recipe.name}
        material = key_material(nid, cls.version, params, inputs, source_hashes, tools)
        keys[nid] = compute_key(material)
        specs.append(StageSpec(
            stage=nid, name=cls.name, entry=f"{cls.__module__}:{cls.__qualname__}", variant=variant,
            recipe=recipe.name, key=keys[nid],
            material=material, inputs=inputs,
            source_paths={n: str(p) for n, p in source_paths.items()},
            resource=cls.resource, store=store, workspace=settings.artifacts / recipe.name / nid,
            blocked=blocked,
        ))
    if own_cache:
        cache.save()
    return specs
