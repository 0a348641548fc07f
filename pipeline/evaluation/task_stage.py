"""The base of every `<backend>.tasks` stage: the recipe's `eval.tasks` (problems file hashed into
the key, prompts, budgets, limit), the model's tokenizer and chat template, the shared loop
(pipeline/evaluation/tasks.py) and the outputs (tasks.json, answers.jsonl). A backend gives only
its greedy generator."""
from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.engine.errors import KilnError
from pipeline.engine.stage import NoParams, Stage, StageContext

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.evaluation.tasks import Generate
    from pipeline.recipe.load import Recipe

TASKS_FILE, ANSWERS_FILE = "tasks.json", "answers.jsonl"


def chat_prompt(tokenizer: Any, system: str, user: str) -> str:
    """The model's own chat template around one system and one user turn, ready for the reply; a
    model without one (a base model) gets the two joined by a blank line and a line break."""
    if not getattr(tokenizer, "chat_template", None):
        return f"{system}\n\n{user}\n"
    return tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                         add_generation_prompt=True, tokenize=False)


def end_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that end a reply: the tokenizer's end-of-sequence and its other special tokens (a chat
    model's end-of-turn)."""
    return frozenset({tokenizer.eos_token_id, *(getattr(tokenizer, "additional_special_tokens_ids", None) or [])} - {None})


def until_end(ids: list[int], tokenizer: Any) -> list[int]:
    """A generated id list up to (not including) the first id that ends a reply."""
    ends = end_ids(tokenizer)
    return next((ids[:i] for i, t in enumerate(ids) if t in ends), ids)


class TasksStage(Stage):
    """Task accuracy of one variant under token budgets (the recipe's `eval.tasks`)."""

    Params = NoParams
    resource = "heavy"
    runner: ClassVar[str]  # what generates the replies, as the page shows it

    @classmethod
    def applies(cls, recipe: Recipe) -> bool:
        return recipe.spec.eval.tasks is not None

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        tasks = recipe.spec.eval.tasks.model_dump(mode="json")
        del tasks["problems"]  # its content enters the key (sources), not where it lies
        return tasks

    @classmethod
    def sources(cls, recipe: Recipe, variant: str = "") -> dict[str, Path]:
        path = recipe.resolve_path(recipe.spec.eval.tasks.problems)
        if not path.is_file():
            raise KilnError(f"{recipe.where('eval', 'tasks', 'problems')}: eval.tasks.problems: {path} is not a file")
        return {"problems": path}

    def variant_name(self, ctx: StageContext) -> str:
        """The name of the variant in tables and plots (a quant type, `MNN`, ...)."""
        return ctx.variant

    def generator(self, ctx: StageContext, tokenizer: Any) -> AbstractContextManager[Generate]:
        raise NotImplementedError

    def run(self, ctx: StageContext) -> None:
        from transformers import AutoTokenizer

        from pipeline.evaluation.tasks import load_problems, run_tasks

        p, name = ctx.params, self.variant_name(ctx)
        problems = load_problems(ctx.sources["problems"], ctx.sources["problems"].name)[:p["limit"]]
        tokenizer = AutoTokenizer.from_pretrained(ctx.inputs["model"])
        with self.generator(ctx, tokenizer) as generate:
            accuracy, answers = run_tasks(problems, p["prompts"], p["budgets"], generate,
                                          lambda ids: tokenizer.decode(ids, skip_special_tokens=True), f"{name} tasks")
        result = {"type": name, "label": p["label"], "problems": len(problems), "budgets": p["budgets"],
                  "prompts": p["prompts"], "runner": self.runner, "accuracy": accuracy}
        (ctx.out / TASKS_FILE).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        (ctx.out / ANSWERS_FILE).write_text("".join(json.dumps(a, sort_keys=True) + "\n" for a in answers))
        for prompt, rows in accuracy.items():
            ctx.log.info(f"{name} {prompt}: " + ", ".join(
                f"{b} tokens {r['accuracy']:.0%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]" for b, r in rows.items()))
