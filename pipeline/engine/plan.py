"""Planning: recipe → ordered stage specs with their action keys. Pure apart from reading recipe
files, hashing sources and code (through the stat cache) and reading action records.

A stage's action key holds its inputs' *output digests*. When an input's action record is in the
store, its digest is known at plan time and so is the stage's key (a no-op plans everything).
When it is not (the input will run first), the stage is *pending*: its key is provisional
(the input's action key stands in for the digest it will have) and is settled by `resolve` once
the input has built, just before the stage itself is checked or run.

A stage whose sources are not on this machine (a model that was never downloaded) still plans: its
key uses a placeholder and the spec carries the error the stage will report when asked to run.
"""
from __future__ import annotations

import graphlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.code import code_hashes
from pipeline.engine.errors import KilnError
from pipeline.engine.hashing import StatCache
from pipeline.engine.keys import compute_key
from pipeline.engine.stage import Stage, node_id, recipe_nodes
from pipeline.engine.store import Store
from pipeline.engine.tools import fingerprints

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

PENDING = "pending:"  # prefix of a provisional input: the input's action key, its output unknown yet


@dataclass(frozen=True)
class StageSpec:
    stage: str                    # node id: "name" or "name@variant"
    name: str                     # the Stage class's name
    entry: str                    # "module:Class" the child process runs
    variant: str
    recipe: str
    static: dict[str, Any]        # key material but the inputs: stage, version, params, sources, tools, code
    input_nodes: tuple[str, ...]  # node ids whose outputs it reads
    source_paths: dict[str, str]  # source name → path (not part of the key)
    resource: str
    memory: int                   # expected peak RSS in bytes (0 = not declared)
    store: Path
    workspace: Path
    blocked: str | None = None    # why this stage cannot run here
    retries: int = 0              # failed runs tried again (Stage.retries)
    # settled by `resolve`:
    key: str = ""                 # the action key (provisional while `pending`)
    inputs: dict[str, str] | None = None  # input node → its output digest (PENDING + key if not built)
    output: str | None = None     # the output digest the store records for `key`
    pending: str | None = None    # the nearest input whose output is not built yet

    @property
    def task_name(self) -> str:
        return f"{self.recipe}:{self.stage}"

    @property
    def material(self) -> dict[str, Any]:
        return {**self.static, "inputs": self.inputs or {}}


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


def resolve(specs: list[StageSpec], assume: dict[str, str] | None = None) -> list[StageSpec]:
    """Settle every spec's key against the store as it is now (specs in plan order).

    `assume` ({node: output digest}) stands in for outputs the store does not record: `explain`
    uses it to ask "if this stage came out as before, would the rest be kept?".
    """
    outputs: dict[str, str] = {}   # node → known output digest
    keys: dict[str, str] = {}
    settled: list[StageSpec] = []
    stores: dict[Path, Store] = {}
    for spec in specs:
        store = stores.setdefault(spec.store, Store(spec.store))
        inputs = {d: outputs.get(d, PENDING + keys[d]) for d in spec.input_nodes}
        pending = next((d for d in spec.input_nodes if d not in outputs), None)
        key = compute_key({**spec.static, "inputs": inputs})
        output = None if pending or spec.blocked else store.output_of(key)
        known = output or (assume or {}).get(spec.stage)
        keys[spec.stage] = key
        if known is not None:
            outputs[spec.stage] = known
        settled.append(replace(spec, key=key, inputs=inputs, output=output, pending=pending))
    return settled


def resolved(spec: StageSpec, specs: list[StageSpec]) -> StageSpec:
    """`spec` as it plans now (its inputs may have been built since the plan was made): only it and
    its ancestors are settled, so checking every stage of a no-op stays linear-ish."""
    if spec.pending is None:
        # its inputs' outputs were known when planned, and a record never changes once written:
        # the key stands; only the output may have appeared since (another builder)
        if spec.output is not None or spec.blocked:
            return spec
        return replace(spec, output=Store(spec.store).output_of(spec.key))
    wanted = {spec.stage}
    for s in reversed(specs):
        if s.stage in wanted:
            wanted.update(s.input_nodes)
    return next(s for s in resolve([s for s in specs if s.stage in wanted]) if s.stage == spec.stage)


def plan(recipe: Recipe, cache: StatCache | None = None) -> list[StageSpec]:
    settings = recipe.settings
    own_cache = cache is None
    cache = cache or StatCache(settings.artifacts / ".statcache.json")
    store = settings.store_dir()
    specs: list[StageSpec] = []
    blocked_nodes: dict[str, str] = {}
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
        input_nodes = tuple(cls.inputs(recipe, variant))
        # the first blocked input in plan order: the root cause upstream, not a symptom of it
        blocked = blocked or next((blocked_nodes[s.stage] for s in specs if s.stage in input_nodes
                                   and s.stage in blocked_nodes), None)
        if blocked:
            blocked_nodes[nid] = blocked
        params = cls.params(recipe, variant)
        if cls.per_recipe:
            params = {**params, "recipe": recipe.name}
        static = {"stage": nid, "version": cls.version, "params": params, "sources": source_hashes,
                  "tools": tools, "code": code_hashes(cls.__module__, cache)}
        specs.append(StageSpec(
            stage=nid, name=cls.name, entry=f"{cls.__module__}:{cls.__qualname__}", variant=variant,
            recipe=recipe.name, static=static, input_nodes=input_nodes,
            source_paths={n: str(p) for n, p in source_paths.items()},
            resource=cls.resource, memory=cls.peak_memory(recipe, variant) or 0, store=store,
            workspace=settings.artifacts / recipe.name / nid,
            blocked=blocked, retries=cls.retries,
        ))
    if own_cache:
        cache.save()
    return resolve(specs)
