"""mnn.tasks: task accuracy of the MNN export under token budgets (the recipe's `eval.tasks`;
pipeline/evaluation/task_stage.py), answered greedily by MNN's LLM engine (pymnn, host CPU) from
the model's own chat template, token ids in and out (MNN's tokenizer has the model's ids:
mnn.verify checks it)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pipeline.engine.templating import TEMPLATES
from pipeline.evaluation.task_stage import TasksStage, chat_prompt, until_end
from pipeline.mnn.runtime import CONFIG_TEMPLATE, EXPORT, RUNTIME, TASKS, numeric_settings

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pipeline.engine.stage import StageContext
    from pipeline.evaluation.tasks import Generate
    from pipeline.recipe.load import Recipe


class MnnTasks(TasksStage):
    """Task accuracy of the MNN export at each token budget and prompt variant (MNN's engine, greedy)."""

    name = TASKS
    version = 1
    tools = ("python", "mnn", "transformers")
    runtimes = (RUNTIME,)
    requires = (EXPORT, "model")
    runner = "MNN's LLM engine (pymnn, host CPU), greedy"

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return {**super().params(recipe, variant), "runtime": numeric_settings(recipe)}

    @classmethod
    def sources(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return {**super().sources(recipe, variant), CONFIG_TEMPLATE: TEMPLATES / CONFIG_TEMPLATE}

    def variant_name(self, ctx: StageContext) -> str:
        return "MNN"

    @contextmanager
    def generator(self, ctx: StageContext, tokenizer: Any) -> Iterator[Generate]:
        from pipeline.mnn.runtime import greedy_host_config, loaded

        with loaded(ctx.inputs[EXPORT], greedy_host_config(ctx.params["runtime"]), ctx.tmp / "run") as llm:
            def generate(system: str, user: str, budget: int) -> list[int]:
                ids = tokenizer(chat_prompt(tokenizer, system, user), add_special_tokens=False)["input_ids"]
                llm.llm.reset()
                llm.llm.set_config({"max_new_tokens": budget})
                out = [int(t) for t in llm.llm.generate(ids)]
                llm.llm.reset()
                return until_end(out, tokenizer)[:budget]

            yield generate
