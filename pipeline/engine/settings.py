"""Where things live: recipes, workspace, store. Env vars override pyproject.

KILN_RECIPES   recipes directory            (default: <repo>/recipes)
KILN_ARTIFACTS workspace root               (default: <repo>/artifacts)
KILN_STORE     content-addressed store      (default: [tool.kiln].store; never a recipe's choice)
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pipeline import ROOT


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

    @classmethod
    def from_env(cls) -> Settings:
        conf = pyproject_kiln()
        return cls(
            root=ROOT,
            recipes_dir=Path(os.environ.get("KILN_RECIPES", ROOT / "recipes")).resolve(),
            artifacts=Path(os.environ.get("KILN_ARTIFACTS", ROOT / "artifacts")).resolve(),
            default_recipe=os.environ.get("KILN_DEFAULT_RECIPE", conf.get("default_recipe", "")),
            heavy_slots=int(os.environ.get("KILN_HEAVY_SLOTS", conf.get("heavy_slots", 1))),
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
