"""llamacpp.tasks: task accuracy of each quant type under token budgets (the recipe's
`eval.tasks`; pipeline/evaluation/task_stage.py), answered greedily by the host build's
llama-completion on the GGUF with the model's own chat template. The reply is re-tokenized by the
model's tokenizer (llama.cpp prints text), which is how a cut at N tokens is taken."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pipeline.engine.proc import run_tool, threads
from pipeline.evaluation.task_stage import TasksStage, chat_prompt
from pipeline.llamacpp.common import (
    HOST_BUILD,
    RUNTIME,
    TASK_RUNNER,
    TASKS,
    gguf_in,
    gguf_types,
    host_tool,
    quant_node,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pipeline.engine.stage import StageContext
    from pipeline.evaluation.tasks import Generate
    from pipeline.recipe.load import Recipe


class LlamacppTasks(TasksStage):
    """Task accuracy of a quant type at each token budget and prompt variant (host llama-completion)."""

    name = TASKS
    version = 1
    tools = ("python", "transformers")
    runtimes = (RUNTIME,)
    runner = f"{TASK_RUNNER} (host build), greedy"

    @classmethod
    def variants(cls, recipe: Recipe) -> list[str]:
        return gguf_types(recipe)

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str) -> list[str]:
        return [quant_node(variant), HOST_BUILD, "model"]

    @contextmanager
    def generator(self, ctx: StageContext, tokenizer: Any) -> Iterator[Generate]:
        model = gguf_in(ctx.inputs[quant_node(ctx.variant)])
        runner = host_tool(ctx, TASK_RUNNER)

        def generate(system: str, user: str, budget: int) -> list[int]:
            prompt = chat_prompt(tokenizer, system, user)
            if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
                prompt = prompt[len(tokenizer.bos_token):]  # llama.cpp adds the model's BOS itself
            file = ctx.tmp / "prompt.txt"
            file.write_text(prompt, encoding="utf-8")
            context = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + budget + 16
            out = run_tool([runner, "-m", model, "-f", file, "-n", budget, "-c", context, "--temp", "0", "-s", "0",
                            "-t", threads(), "-no-cnv", "--no-display-prompt", "--no-warmup"], capture=True)
            text = out.stdout.removesuffix("\n").removesuffix(" [end of text]")
            return tokenizer(text, add_special_tokens=False)["input_ids"][:budget]

        yield generate
