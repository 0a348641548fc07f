"""compare: one quality page across recipes that share a model: every variant's perplexity on the
same token ids (the `reference` stage's), KL divergence and top-1 agreement against the float
model, size on disk; a table ranked by perplexity and a size-vs-perplexity plot, written to
`artifacts/compare/index.html` (the table is printed too). Reads built outputs only: it never
builds; an unbuilt recipe is named with the command that builds it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.engine.errors import KilnError
from pipeline.engine.plan import StageSpec, plan, resolve
from pipeline.engine.settings import Settings
from pipeline.engine.store import Store
from pipeline.registry import load_recipe

PLOT = "quality-{n}.svg"


def _out(spec: StageSpec) -> Path:
    return Store(spec.store).out(spec.output or "")


def recipe_quality(name: str, settings: Settings) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """(reference output digest, reference summary, perplexity rows) of a built recipe."""
    from pipeline.evaluation.logprobs import load_summary
    from pipeline.evaluation.quality import read_quality

    specs = resolve(plan(load_recipe(name, settings)))
    reference = next((s for s in specs if s.name == "reference"), None)
    if reference is None:
        raise KilnError(f"recipe {name!r} has no perplexity evaluation (its target runtime has none)")
    scored = [s for s in specs if s.name.endswith(".perplexity")]
    unbuilt = [s.stage for s in [reference, *scored] if not s.output]
    if unbuilt:
        raise KilnError(f"recipe {name!r} is not built ({', '.join(unbuilt)}): run `doit recipe={name}` first")
    rows = [{**read_quality(_out(s)), "recipe": name} for s in scored]
    return reference.output or "", load_summary(_out(reference)), rows


def compare(names: list[str], settings: Settings, out_dir: Path) -> tuple[Path, str]:
    """Write the page; return it and the Markdown tables printed for the terminal."""
    from pipeline.evaluation.html import esc, figure, table, write_page
    from pipeline.evaluation.plots import size_vs_ppl
    from pipeline.evaluation.quality import float_row
    from pipeline.evaluation.quality_table import QUALITY_HEADERS, quality_cells, quality_table

    groups: dict[str, tuple[dict[str, Any], list[dict[str, Any]], list[str]]] = {}
    for name in dict.fromkeys(names):
        digest, summary, rows = recipe_quality(name, settings)
        group = groups.setdefault(digest, (summary, [], []))
        group[1].extend(rows)
        group[2].append(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    body, text = [], []
    for n, (summary, rows, recipes) in enumerate(groups.values(), 1):
        base = {**float_row(summary), "name": "float32 HF", "recipe": "(reference)"}
        ranked = sorted([base, *({**r, "name": f"{r['variant']} · {r['recipe']}"} for r in rows)], key=lambda r: r["ppl"])
        protocol = (f"{summary['windows']} windows of {summary['window']} tokens of the evaluation text, tokenized once; "
                    f"the second half of each window scored ({summary['float']['tokens_scored']} tokens); KL divergence "
                    "and top-1 agreement against the float model's log-probabilities")
        cells = [[i + 1, *quality_cells(r, base["ppl"], r["name"])] for i, r in enumerate(ranked)]
        plot = PLOT.format(n=n)
        size_vs_ppl(ranked, out_dir / plot, f"{', '.join(recipes)}: size vs perplexity")
        body += [f"<h2>Model group {n}: {esc(', '.join(recipes))}</h2>", f"<p>{esc(protocol)}.</p>",
                 table(["rank", "variant · recipe", *QUALITY_HEADERS[1:]], cells, numeric={0, 3, 4, 5, 6, 7, 8},
                       caption="ranked by perplexity"),
                 figure(plot, f"size on disk vs perplexity, model group {n}")]
        text += [f"## {', '.join(recipes)}", "", protocol + ".", "",
                 quality_table([{**r, "variant": r["name"]} for r in ranked], base["ppl"]), ""]
    page = out_dir / "index.html"
    write_page(page, "Kiln: quality across recipes", body)
    return page, "\n".join(text)


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="one quality table and plot across built recipes that share a model")
    p.add_argument("recipes", nargs="+", help="recipe names")
    p.add_argument("--out", type=Path, help="output folder (default: artifacts/compare)")

    def run(a, s: Settings) -> int:
        page, text = compare(a.recipes, s, a.out or s.artifacts / "compare")
        print(text)
        print(f"kiln: wrote {s.shown(page)}")
        return 0

    p.set_defaults(func=run)
