"""Kiln's doit entry point: `doit recipe=<name>` builds one recipe.

Thin on purpose: read the variable, plan, hand doit one task per stage.
`doit list` shows the stages; `doit explain|gc|verify` manage the store.
"""
from doit import get_var

from pipeline.cli.doit_tasks import load_or_exit, settings_or_exit, stage_tasks
from pipeline.cli.store_tasks import store_tasks

SETTINGS = settings_or_exit()
RECIPE, SPECS = load_or_exit(get_var("recipe", SETTINGS.default_recipe), SETTINGS)
DOIT_CONFIG = {"default_tasks": [RECIPE.name]}


def task_kiln():
    yield from stage_tasks(RECIPE, SPECS, SETTINGS)
    yield from store_tasks(RECIPE, SETTINGS)
