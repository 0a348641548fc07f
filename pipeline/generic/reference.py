"""reference: the float model's log-probabilities on the evaluation text, the yardstick of every
backend's perplexity (pipeline/evaluation/logprobs.py: one protocol, llama.cpp's file format).

The evaluation text is tokenized once by the model's own tokenizer and cut into
`eval.perplexity.windows` windows of `eval.perplexity.window` tokens; the float32 HF model,
streamed one decoder layer at a time (an 8B model is scored in a few GB), gives the log-probs of
the second half of each window. Every backend's perplexity stage reads these token ids and
scores its own logits against these log-probs (perplexity, KL divergence, top-1 agreement).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError
from pipeline.engine.stage import NoParams, Stage, StageContext
from pipeline.evaluation import EVALUATED_RUNTIMES

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

class Reference(Stage):
    """Float log-probabilities of the evaluation text (settings: the recipe's `eval.perplexity`)."""

    name = "reference"
    version = 1
    Params = NoParams
    tools = ("python", "torch", "transformers", "safetensors", "numpy")
    resource = "heavy"
    runtimes = EVALUATED_RUNTIMES
    requires = ("model", "text")

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return recipe.spec.eval.perplexity.model_dump(mode="json")

    @classmethod
    def peak_memory(cls, recipe: Recipe, variant: str = "") -> int | None:
        from pipeline.recipe.size import streamed_float_peak

        return streamed_float_peak(recipe)

    def run(self, ctx: StageContext) -> None:
        import numpy as np
        from transformers import AutoConfig, AutoTokenizer

        from pipeline.engine.progress import progress
        from pipeline.evaluation.logprobs import (
            MAGIC,
            REFERENCE_FILE,
            SUMMARY_FILE,
            Scorer,
            bos_added,
            encode,
            scored,
            window_ids,
        )
        from pipeline.generic.layers import streamed_logits

        window, count = ctx.params["window"], ctx.params["windows"]
        model_dir = ctx.inputs["model"]
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        text = (ctx.inputs["text"] / "evaluation.txt").read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < window * count:
            raise KilnError(f"eval.perplexity: the evaluation text is {len(ids)} tokens; {count} windows of {window} "
                            f"need {window * count} (lower eval.perplexity.windows or .window, or give more text)")
        tokens = np.array(ids[:window * count], dtype=np.int32).reshape(count, window)
        summary: dict[str, Any] = {"window": window, "windows": count, "n_vocab": vocab, "bos": bos_added(tokenizer)}
        first, per = scored(window)
        scorer = Scorer(vocab)
        runs = [window_ids(summary, row) for row in tokens]
        with (ctx.out / REFERENCE_FILE).open("wb") as f:
            f.write(MAGIC + np.array([window, vocab, count], dtype="<i4").tobytes() + tokens.astype("<i4").tobytes())
            logits = streamed_logits(model_dir, runs, slice(first, first + per))
            for w, got in progress(enumerate(logits), "float reference", "window", count):
                got = got.numpy()
                records = encode(got)
                f.write(records.astype("<u2").tobytes())
                scorer.add(got, records, tokens[w, first + 1:first + 1 + per])
        weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        summary["float"] = {**scorer.result(), "size_bytes": weights}
        (ctx.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        ctx.log.info(f"float reference: PPL {summary['float']['ppl']:.4f} on {scorer.count} tokens "
                     f"({count} windows of {window}, second halves scored); log-prob rounding KLD "
                     f"{summary['float']['kld']:.2e}")
