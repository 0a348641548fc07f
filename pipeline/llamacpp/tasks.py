"""llamacpp.tasks: task accuracy of each quant type under token budgets (the recipe's
`eval.tasks`), generated greedily by the host build's llama-completion on the GGUF with the
model's own chat template; scoring in pipeline/evaluation/tasks.py.

Prompt variants that state no budget are generated once at the largest budget and cut to each
smaller one (the generated text re-tokenized by the model's tokenizer, the first N tokens kept:
what a device stopping at N tokens would have shown); the budget-aware variant states the budget
in the prompt, so it is generated once per budget. Every generation, its extracted answer and its
verdict go to answers.jsonl; accuracy with 95% Wilson intervals to tasks.json."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError
from pipeline.engine.proc import run_tool, threads
from pipeline.engine.stage import NoParams, StageContext
from pipeline.llamacpp.common import HOST_BUILD, TASK_RUNNER, TASKS, PerQuantType, gguf_in, host_tool, quant_node

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.recipe.load import Recipe

TASKS_FILE, ANSWERS_FILE = "tasks.json", "answers.jsonl"


class LlamacppTasks(PerQuantType):
    """Task accuracy of a quant type at each token budget and prompt variant (host llama-completion)."""

    name = TASKS
    version = 1
    Params = NoParams
    tools = ("python", "transformers")
    resource = "heavy"

    @classmethod
    def applies(cls, recipe: Recipe) -> bool:
        return recipe.spec.eval.tasks is not None

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str) -> list[str]:
        return [quant_node(variant), HOST_BUILD, "model"]

    @classmethod
    def params(cls, recipe: Recipe, variant: str) -> dict[str, Any]:
        tasks = recipe.spec.eval.tasks.model_dump(mode="json")
        del tasks["problems"]  # its content enters the key (sources), not where it lies
        return {**tasks, "type": variant}

    @classmethod
    def sources(cls, recipe: Recipe, variant: str) -> dict[str, Path]:
        path = recipe.resolve_path(recipe.spec.eval.tasks.problems)
        if not path.is_file():
            raise KilnError(f"{recipe.where('eval', 'tasks', 'problems')}: eval.tasks.problems: {path} is not a file")
        return {"problems": path}

    def run(self, ctx: StageContext) -> None:
        from transformers import AutoTokenizer

        from pipeline.evaluation.tasks import load_problems, run_tasks

        p = ctx.params
        problems = load_problems(ctx.sources["problems"], ctx.sources["problems"].name)[:p["limit"]]
        tokenizer = AutoTokenizer.from_pretrained(ctx.inputs["model"])
        model = gguf_in(ctx.inputs[quant_node(ctx.variant)])
        runner = host_tool(ctx, TASK_RUNNER)

        def generate(system: str, user: str, budget: int) -> list[int]:
            prompt = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                                   add_generation_prompt=True, tokenize=False)
            if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
                prompt = prompt[len(tokenizer.bos_token):]  # llama.cpp adds the model's BOS itself
            file = ctx.tmp / "prompt.txt"
            file.write_text(prompt, encoding="utf-8")
            context = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + budget + 16
            out = run_tool([runner, "-m", model, "-f", file, "-n", budget, "-c", context, "--temp", "0", "-s", "0",
                            "-t", threads(), "-no-cnv", "--no-display-prompt", "--no-warmup"], capture=True)
            text = out.stdout.removesuffix("\n").removesuffix(" [end of text]")
            return tokenizer(text, add_special_tokens=False)["input_ids"][:budget]

        accuracy, answers = run_tasks(problems, p["prompts"], p["budgets"], generate,
                                      lambda ids: tokenizer.decode(ids, skip_special_tokens=True), f"{ctx.variant} tasks")
        result = {"type": ctx.variant, "label": p["label"], "problems": len(problems), "budgets": p["budgets"],
                  "prompts": p["prompts"], "runner": f"{TASK_RUNNER} (host build), greedy", "accuracy": accuracy}
        (ctx.out / TASKS_FILE).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        (ctx.out / ANSWERS_FILE).write_text("".join(json.dumps(a, sort_keys=True) + "\n" for a in answers))
        for variant, rows in accuracy.items():
            ctx.log.info(f"{ctx.variant} {variant}: " + ", ".join(
                f"{b} tokens {r['accuracy']:.0%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]" for b, r in rows.items()))
