"""report: the recipe's results in one place — perplexity table (the float reference and each
GGUF on the shared protocol's windows) and the emulated completion — as report.md and
report.json; the emulated
llama-bench figures go to bench.md / bench.json in ctx.info, outside the output (they differ on
every build)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pipeline.engine.stage import NoParams, StageContext, node_id
from pipeline.llamacpp.common import PERPLEXITY, REPORT, VERIFY, LlamacppStage, gguf_types, perplexity_variants

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe


class LlamacppReport(LlamacppStage):
    """Evaluation report (report.md, report.json)."""

    name = REPORT
    version = 4  # 2: bench figures unshipped; 3: bench figures in info; 4: the shared perplexity protocol
    Params = NoParams
    per_recipe = True

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str = "") -> list[str]:
        return ["reference", *(node_id(PERPLEXITY, v) for v in perplexity_variants(recipe)),
                *(node_id(VERIFY, v) for v in gguf_types(recipe))]

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return {"model": recipe.model.name, "target": recipe.target.name, "description": recipe.target.description}

    @classmethod
    def ships(cls, recipe: Recipe, variant: str = "") -> str | None:
        return "report"

    def run(self, ctx: StageContext) -> None:
        from pipeline.evaluation.logprobs import load_summary
        from pipeline.evaluation.quality import float_row, read_quality
        from pipeline.evaluation.quality_table import quality_table

        summary = load_summary(ctx.inputs["reference"])
        ppl = [read_quality(d) for n, d in ctx.inputs.items() if n.startswith(PERPLEXITY)]
        runs = [json.loads((d / "verify.json").read_text()) for n, d in ctx.inputs.items() if n.startswith(VERIFY)]
        p = ctx.params
        md = [f"# {ctx.recipe_name}: {p['model']} on {p['target']}", "",
              f"## Perplexity (held-out text: {summary['windows']} windows of {summary['window']} tokens, second "
              "halves scored; KL divergence and top-1 agreement against the float model)", "",
              quality_table([float_row(summary), *ppl], summary["float"]["ppl"]), ""]
        bench = {r["type"]: r.pop("bench") for r in runs}
        bench_md = [f"# {ctx.recipe_name}: llama-bench ({runs[0]['label'] if runs else ''})", "",
                    "| type | test | tokens | tokens/s |", "|---|---|---:|---:|",
                    *[f"| {t} | {b['test']} | {b['tokens']} | {b['tokens_per_s']} |" for t, rows in bench.items() for b in rows]]
        for r in runs:
            md += [f"## {r['type']}: completion ({r['label']})", "", "```", r["completion"].strip(), "```", ""]
        (ctx.out / "report.md").write_text("\n".join(md))
        (ctx.out / "report.json").write_text(json.dumps({"perplexity": ppl, "float": float_row(summary), "verify": runs},
                                                        indent=2, sort_keys=True) + "\n")
        (ctx.info / "bench.md").write_text("\n".join(bench_md) + "\n")
        (ctx.info / "bench.json").write_text(json.dumps(bench, indent=2, sort_keys=True) + "\n")
        print("\n".join(md + [""] + bench_md))
