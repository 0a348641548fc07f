"""qnn.tasks: task accuracy of the quantized graphs under token budgets (the recipe's
`eval.tasks`; pipeline/evaluation/task_stage.py), answered greedily by onnxruntime (CPU) on
qnn.quantize's QDQ ONNX graphs the way Genie runs the binaries: the chat-templated prompt through
the widest AR graph, the reply one token at a time through AR-1, within the graphs' context."""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError
from pipeline.evaluation.task_stage import TasksStage, chat_prompt, end_ids
from pipeline.qnn.common import QUANTIZE, RUNTIME, TASKS

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pipeline.engine.stage import StageContext
    from pipeline.evaluation.tasks import Generate
    from pipeline.recipe.load import Recipe


class QnnTasks(TasksStage):
    """Task accuracy of the QDQ graphs at each token budget and prompt variant (onnxruntime, greedy)."""

    name = TASKS
    version = 1
    tools = ("python", "torch", "transformers", "onnxruntime", "numpy")
    runtimes = (RUNTIME,)
    requires = (QUANTIZE, "model")
    runner = "onnxruntime (CPU) on the QDQ graphs, AR-N prefill then AR-1 decode, greedy"

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return {**super().params(recipe, variant), "context_length": recipe.spec.context_length}

    def variant_name(self, ctx: StageContext) -> str:
        return "QDQ"

    @contextmanager
    def generator(self, ctx: StageContext, tokenizer: Any) -> Iterator[Generate]:
        from pipeline.generic.layers import meta_model
        from pipeline.qnn.adapted_llama import io_names, prefill_and_decode
        from pipeline.qnn.onnx_check import ort_session, ort_step

        quantized, context = ctx.inputs[QUANTIZE], ctx.params["context_length"]
        graphs = json.loads((quantized / "quantize.json").read_text())["graphs"]
        model = meta_model(ctx.inputs["model"])
        names_in, names_out = io_names(model.config.num_hidden_layers)
        steps = {g["ar"]: ort_step(ort_session(quantized / g["qdq"]), names_in, names_out) for g in graphs}
        stop = end_ids(tokenizer)

        def generate(system: str, user: str, budget: int) -> list[int]:
            ids = tokenizer(chat_prompt(tokenizer, system, user), add_special_tokens=False)["input_ids"]
            if len(ids) + budget > context:
                raise KilnError(f"eval.tasks: a prompt of {len(ids)} tokens and a budget of {budget} exceed the graphs' "
                                f"context_length {context}")
            _, generated = prefill_and_decode(steps, model, ids, budget, context, stop=stop, show=False)
            return generated

        yield generate
