"""llamacpp.perplexity: every GGUF (the float one and each quant type) scored by the host build's
`llama-perplexity --kl-divergence` on the float reference's token ids and log-probs (the
`reference` stage: one protocol for every backend), one variant each (`float`, `Q4_K_M`, ...)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError
from pipeline.engine.proc import run_tool, threads
from pipeline.engine.stage import NoParams, StageContext
from pipeline.llamacpp.common import (
    CONVERT,
    FLOAT,
    HOST_BUILD,
    PERPLEXITY,
    QUANTIZE,
    LlamacppStage,
    gguf_in,
    host_tool,
    perplexity_variants,
    quant_node,
)

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|nan|-?inf)"
# one line per window, cumulative: PPL ± · ln(PPL/PPL base) ± · KLD ± · Δp RMS ± % · same top ± %
_CHUNK = re.compile(rf"^\s*(\d+)((?:\s+{_NUMBER}\s+±\s+{_NUMBER}(?:\s*%)?){{5}})\s*$", re.M)
# the closing statistics (printed from 100 scored tokens on)
_FINAL = ((r"Mean PPL\(Q\)\s*:", "ppl", "ppl_err"), (r"Mean PPL\(base\)\s*:", "ppl_base", "ppl_base_err"),
          (r"Mean\s+KLD:", "kld", "kld_err"), (r"Same top p:", "same_top_pct", "same_top_err_pct"))


def parse_kld(output: str, windows: int) -> dict[str, Any]:
    """Statistics of `llama-perplexity --kl-divergence`: the closing block when printed, else
    the last window's cumulative line. Fails unless every window was scored."""
    lines = [(int(m.group(1)), [float(x) for x in re.findall(_NUMBER, m.group(2))]) for m in _CHUNK.finditer(output)]
    if not lines or lines[-1][0] != windows:
        raise KilnError(f"llama-perplexity scored {lines[-1][0] if lines else 0} of {windows} windows")
    v = lines[-1][1]
    stats: dict[str, Any] = {"ppl": v[0], "ppl_err": v[1], "kld": v[4], "kld_err": v[5], "rms_dp_pct": v[6],
                             "same_top_pct": v[8], "same_top_err_pct": v[9]}
    for label, value, error in _FINAL:
        m = re.search(rf"{label}\s*({_NUMBER})\s*±\s*({_NUMBER})", output)
        if m:
            stats[value], stats[error] = float(m.group(1)), float(m.group(2))
    return stats


def gguf_adds_bos(path: Any) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.parts[-1][0]) if field is not None else False


class LlamacppPerplexity(LlamacppStage):
    """Perplexity and KL divergence of each GGUF on the float reference's tokens."""

    name = PERPLEXITY
    version = 2  # 2: the shared protocol (reference stage's tokens and log-probs, --kl-divergence)
    Params = NoParams
    tools = ("python", "gguf")

    @classmethod
    def variants(cls, recipe: Recipe) -> list[str]:
        return perplexity_variants(recipe)

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str) -> list[str]:
        model = CONVERT if variant == FLOAT else quant_node(variant)
        return [model, HOST_BUILD, "reference"]

    @classmethod
    def params(cls, recipe: Recipe, variant: str) -> dict[str, Any]:
        return {"type": recipe.scheme.gguf_outtype.upper() if variant == FLOAT else variant}

    def run(self, ctx: StageContext) -> None:
        from pipeline.evaluation.logprobs import REFERENCE_FILE, load_summary
        from pipeline.evaluation.quality import quality_row, write_quality

        reference = ctx.inputs["reference"]
        summary = load_summary(reference)
        model_node = next(n for n in ctx.inputs if n.startswith((CONVERT, QUANTIZE)))
        model = gguf_in(ctx.inputs[model_node])
        if gguf_adds_bos(model) != (summary["bos"] is not None):
            raise KilnError(f"{model.name} {'adds' if summary['bos'] is None else 'does not add'} a BOS token and the "
                            "model's tokenizer does the opposite: the windows would differ from the reference's")
        window = str(summary["window"])
        out = run_tool([host_tool(ctx, "llama-perplexity"), "-m", model, "--kl-divergence-base",
                        reference / REFERENCE_FILE, "--kl-divergence", "-c", window, "-b", window, "-t", threads()],
                       capture=True, echo=True)
        stats = parse_kld(out.stdout, summary["windows"])
        stats["tokens_scored"] = summary["float"]["tokens_scored"]  # the same positions of the same windows
        base = stats.pop("ppl_base", None)
        if base is not None and abs(base / summary["float"]["ppl_base"] - 1) > 1e-3:
            raise KilnError(f"llama-perplexity read the reference's perplexity as {base:.4f}, Kiln wrote "
                            f"{summary['float']['ppl_base']:.4f}: the file was misread")
        label = f"{ctx.params['type']} GGUF, llama.cpp (host CPU)"
        row = quality_row("llama.cpp", ctx.params["type"], label, model.name, model.stat().st_size, stats, summary)
        row["type"] = ctx.params["type"]
        write_quality(ctx.out, row)
        ctx.log.info(f"{model.name}: PPL {stats['ppl']:.4f} ± {stats['ppl_err']:.4f}, KLD vs float "
                     f"{stats['kld']:.5f}, same top-1 {stats['same_top_pct']:.2f}%")
