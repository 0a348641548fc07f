"""Kiln's doit entry point: `doit recipe=<name>` builds one recipe.

Thin on purpose: read the variable, plan, hand doit one task per stage.
`doit list` shows the stages; `doit explain|gc|verify` manage the store.
"""
import sys

from doit import get_var

# Kiln's modules keep their bytecode current even under PYTHONDONTWRITEBYTECODE: compiling the
# ~20 modules that plan a recipe from source is ~40 ms of every no-op run (docs/benchmarks.md).
# Only while planning; the setting holds again for everything after (stages run in children).
_no_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, False
from pipeline.cli.doit_tasks import load_or_exit, settings_or_exit, stage_tasks  # noqa: E402
from pipeline.cli.store_tasks import store_tasks  # noqa: E402

SETTINGS = settings_or_exit()
RECIPE, SPECS = load_or_exit(get_var("recipe", SETTINGS.default_recipe), SETTINGS)
sys.dont_write_bytecode = _no_bytecode
DOIT_CONFIG = {"default_tasks": [RECIPE.name]}


def task_kiln():
    yield from stage_tasks(RECIPE, SPECS, SETTINGS)
    yield from store_tasks(RECIPE, SETTINGS)
