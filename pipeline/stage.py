"""The Stage base class: one subclass per module in pipeline/stages/.

A subclass declares, in one place: its `name`, `version` (bump when its output
changes for the same inputs), `Params` (the schema of `stages.<name>` in a
recipe, which also documents it), the `tools` whose fingerprints enter its key,
its `resource` class, and classmethods that read the recipe: does the stage
apply, which stages feed it, which params and source files enter its key.
`run` does the work in a child process, writing only into `ctx.out`; heavy
libraries are imported inside `run`, never at module level.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from .recipe import Recipe


def node_id(name: str, variant: str = "") -> str:
    return f"{name}@{variant}" if variant else name


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StageContext:
    """What a running stage sees: its params, its inputs' outputs, its sources, its output dir."""

    recipe_name: str
    variant: str
    params: dict[str, Any]
    inputs: dict[str, Path]
    sources: dict[str, Path]
    out: Path
    key: str
    cache: Path  # per-store mutable cache for tools (ccache), shared by every build of any key
    input_keys: dict[str, str] = field(default_factory=dict)
    input_tools: dict[str, dict[str, str]] = field(default_factory=dict)  # tool versions behind each input
    tools: dict[str, str] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("kiln.stage"))


class Stage:
    name: ClassVar[str]
    version: ClassVar[int]
    Params: ClassVar[type[BaseModel]] = NoParams
    tools: ClassVar[tuple[str, ...]] = ()
    resource: ClassVar[Literal["light", "heavy"]] = "light"
    # Top-level files of the output that stay out of the bundle: measurements of the machine that
    # built it (timings, logs with timestamps), different on every build, so the bundle is not.
    unshipped: ClassVar[tuple[str, ...]] = ()
    # The output names its recipe (bundle, READMEs, run.sh): the recipe's name enters the key. A
    # stage without it must not write the recipe's name, since other recipes share its entries.
    per_recipe: ClassVar[bool] = False
    registry: ClassVar[dict[str, type["Stage"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in Stage.registry:
                raise TypeError(f"stage {cls.name!r} registered twice")
            Stage.registry[cls.name] = cls

    # --- planning (pure; runs on every `doit` invocation, keep it cheap) ---
    # A stage may run several times in one recipe, once per *variant* (e.g.
    # one gguf.quantize per quant type); its node id is then "name@variant".
    @classmethod
    def applies(cls, recipe: "Recipe") -> bool:
        return True

    @classmethod
    def variants(cls, recipe: "Recipe") -> list[str]:
        return [""]

    @classmethod
    def inputs(cls, recipe: "Recipe", variant: str) -> list[str]:
        """Node ids (see `node_id`) of the stages whose outputs this one reads."""
        return []

    @classmethod
    def params(cls, recipe: "Recipe", variant: str) -> dict[str, Any]:
        """Everything that determines the output besides inputs, sources and tools."""
        return recipe.stage_params(cls.name)

    @classmethod
    def ships(cls, recipe: "Recipe", variant: str) -> str | None:
        """Where in the bundle's `to_device/` this output goes ('.' = top), or None."""
        return None

    @classmethod
    def sources(cls, recipe: "Recipe", variant: str) -> dict[str, Path]:
        """Files or directories read by the stage, hashed by content into its key."""
        return {}

    @classmethod
    def tool_names(cls, recipe: "Recipe", variant: str) -> tuple[str, ...]:
        """Tools whose fingerprints enter the key (default: the class's `tools`)."""
        return cls.tools

    # --- execution (child process) ---
    def run(self, ctx: StageContext) -> None:
        raise NotImplementedError
