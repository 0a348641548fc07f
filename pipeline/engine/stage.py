"""The Stage base class: one subclass per stage module (listed in pipeline/registry.py).

A subclass declares, in one place: its `name` (`<backend>.<verb>`, or a bare
name for backend-neutral stages), `version` (bump when its output changes for
the same inputs), `Params` (the schema of `stages.<name>` in a recipe, which
also documents it), the `runtimes` it serves, the `tools` whose fingerprints
enter its key, its `resource` class, and classmethods that read the recipe:
extra conditions, which stages feed it, which params and source files enter
its key. `run` does the work in a child process, writing its output into
`ctx.out` (content-addressed: same bytes, same digest, nothing downstream
rebuilt), measurements of the run (timings, a tool's log with timestamps)
into `ctx.info` (kept with the action record, shown in the workspace, never
part of the output or the bundle), scratch into `ctx.tmp` (never published).
Nothing in `out` may depend on the machine, the time or the action key.
Heavy libraries are imported inside `run`, never at module level.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


def node_id(name: str, variant: str = "") -> str:
    """A graph node: the stage's name, plus `@variant` when it runs once per variant."""
    return f"{name}@{variant}" if variant else name


def stage_name(node: str) -> str:
    """The stage name of a node id (`llamacpp.quantize@Q8_0` → `llamacpp.quantize`)."""
    return node.partition("@")[0]


class Strict(BaseModel):
    """Base of every schema a recipe fills: unknown keys refused, types strict (no "2048" → 2048,
    no true → 1), values frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NoParams(Strict):
    """A stage with no settings of its own."""


@dataclass
class StageContext:
    """What a running stage sees: its params, its inputs' outputs, its sources, its output dir."""

    recipe_name: str
    variant: str
    params: dict[str, Any]
    inputs: dict[str, Path]
    sources: dict[str, Path]
    out: Path
    info: Path   # measurements of this run (timings): kept with the action record, not in the output
    tmp: Path    # scratch space beside `out`, removed after the run and never published
    key: str     # the action key: names scratch state (checkpoints), never written into `out`
    cache: Path  # per-store mutable cache for tools (ccache), shared by every build of any key
    resume: Path  # state a killed or failed run of this key resumes from; removed once it publishes
    input_outputs: dict[str, str] = field(default_factory=dict)  # input node → its output digest
    tools: dict[str, str] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("kiln.stage"))


class Stage:
    name: ClassVar[str]
    version: ClassVar[int]
    Params: ClassVar[type[BaseModel]] = NoParams
    # Target runtimes (`recipes/targets/*.yaml`: runtime) the stage serves; empty = every one.
    runtimes: ClassVar[tuple[str, ...]] = ()
    # Node ids whose outputs the stage reads, when they do not depend on the recipe (else: `inputs`).
    requires: ClassVar[tuple[str, ...]] = ()
    tools: ClassVar[tuple[str, ...]] = ()
    resource: ClassVar[Literal["light", "heavy"]] = "light"
    # How many times a failed run is tried again (a tool known to fail now and then). Not in the key.
    retries: ClassVar[int] = 0
    # The output names its recipe (bundle, READMEs, run.sh): the recipe's name enters the key. A
    # stage without it must not write the recipe's name, since other recipes share its entries.
    per_recipe: ClassVar[bool] = False

    # --- planning (pure; runs on every `doit` invocation, keep it cheap) ---
    # A stage may run several times in one recipe, once per *variant* (e.g.
    # one llamacpp.quantize per quant type); its node id is then "name@variant".
    @classmethod
    def serves(cls, recipe: Recipe) -> bool:
        """Is the stage part of this recipe's graph: its runtime, then its own condition."""
        return (not cls.runtimes or recipe.target.runtime in cls.runtimes) and cls.applies(recipe)

    @classmethod
    def applies(cls, recipe: Recipe) -> bool:
        """A condition beyond the runtime (e.g. a scheme option); default: none."""
        return True

    @classmethod
    def variants(cls, recipe: Recipe) -> list[str]:
        return [""]

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str) -> list[str]:
        """Node ids (see `node_id`) of the stages whose outputs this one reads."""
        return list(cls.requires)

    @classmethod
    def params(cls, recipe: Recipe, variant: str) -> dict[str, Any]:
        """Everything that determines the output besides inputs, sources and tools."""
        return recipe.stage_params(cls.name)

    @classmethod
    def ships(cls, recipe: Recipe, variant: str) -> str | None:
        """Where in the bundle's `to_device/` this output goes ('.' = top), or None."""
        return None

    @classmethod
    def sources(cls, recipe: Recipe, variant: str) -> dict[str, Path]:
        """Files or directories read by the stage, hashed by content into its key."""
        return {}

    @classmethod
    def tool_names(cls, recipe: Recipe, variant: str) -> tuple[str, ...]:
        """Tools whose fingerprints enter the key (default: the class's `tools`)."""
        return cls.tools

    @classmethod
    def peak_memory(cls, recipe: Recipe, variant: str) -> int | None:
        """Expected peak RSS in bytes, when it can be told from the recipe (the runner keeps stages
        that would not fit together from running at once); None = not declared."""
        return None

    @classmethod
    def headline(cls, out: Path) -> str | None:
        """One line from a built output for the end of the build (e.g. the runtime's answer)."""
        return None

    # --- execution (child process) ---
    def run(self, ctx: StageContext) -> None:
        raise NotImplementedError


def recipe_nodes(recipe: Recipe) -> list[tuple[type[Stage], str]]:
    """(stage class, variant) of every node the recipe's stages give it, in the stages' order."""
    return [(c, v) for c in recipe.stages if c.serves(recipe) for v in c.variants(recipe)]
