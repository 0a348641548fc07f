"""Where things live: recipes, workspace, store. Env vars override pyproject.

KILN_RECIPES   recipes directory            (default: <repo>/recipes)
KILN_ARTIFACTS workspace root               (default: <repo>/artifacts)
KILN_STORE     content-addressed store      (default: [tool.kiln].store; never a recipe's choice)
KILN_MEMORY_GB memory the stages that declare their peak may reserve together
               (default: [tool.kiln].memory_gb, else 90% of physical memory)
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pipeline import ROOT
from pipeline.engine.errors import KilnError


@cache
def pyproject_kiln() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f).get("tool", {}).get("kiln", {})


@dataclass(frozen=True)
class Settings:
    root: Path
    recipes_dir: Path
    artifacts: Path
    default_recipe: str
    heavy_slots: int
    memory_gb: float | None = None

    @classmethod
    def from_env(cls) -> Settings:
        conf = pyproject_kiln()
        return cls(
            root=ROOT,
            recipes_dir=Path(os.environ.get("KILN_RECIPES", ROOT / "recipes")).resolve(),
            artifacts=Path(os.environ.get("KILN_ARTIFACTS", ROOT / "artifacts")).resolve(),
            default_recipe=os.environ.get("KILN_DEFAULT_RECIPE", conf.get("default_recipe", "")),
            heavy_slots=_heavy_slots(os.environ.get("KILN_HEAVY_SLOTS") or conf.get("heavy_slots", 1)),
            memory_gb=_memory_gb(os.environ.get("KILN_MEMORY_GB") or conf.get("memory_gb")),
        )

    def store_dir(self) -> Path:
        """KILN_STORE beats pyproject's [tool.kiln].store. A recipe cannot choose where Kiln writes
        or which entries it trusts."""
        chosen = os.environ.get("KILN_STORE") or pyproject_kiln().get("store")
        path = Path(chosen) if chosen else self.artifacts / ".store"
        return (path if path.is_absolute() else self.root / path).resolve()

    def shown(self, path: Path) -> str:
        """A path as the user should see it: relative to the repo when inside it."""
        try:
            return str(path.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(path)


def _heavy_slots(value: Any) -> int:
    try:
        slots = int(value)
    except (TypeError, ValueError):
        slots = 0
    if not 1 <= slots <= 256:
        raise KilnError(f"KILN_HEAVY_SLOTS / [tool.kiln].heavy_slots: {str(value)[:40]!r} is not a slot count (1 to 256)")
    return slots


def _memory_gb(value: Any) -> float | None:
    if value in (None, ""):
        return None
    try:
        gb = float(value)
    except (TypeError, ValueError):
        gb = -1.0
    if not 0.5 <= gb <= 1 << 20:
        raise KilnError(f"KILN_MEMORY_GB / [tool.kiln].memory_gb: {str(value)[:40]!r} is not a size in GB "
                        f"(0.5 to 1048576)")
    return gb
