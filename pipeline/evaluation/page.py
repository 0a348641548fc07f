"""The report stage's page: pipeline/generic/report.py's inputs and params turned into
report/index.html, its SVG figures and evaluation.json (the same figures, machine-readable; not
report.json, which llamacpp.report ships into the same folder)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pipeline.engine.proc import run_tool
from pipeline.engine.tools import require_exe
from pipeline.evaluation.html import esc, figure, key_values, table, write_page
from pipeline.evaluation.logprobs import load_summary
from pipeline.evaluation.plots import accuracy_curves, size_vs_ppl
from pipeline.evaluation.quality import float_row, read_quality
from pipeline.evaluation.quality_table import QUALITY_HEADERS, quality_cells
from pipeline.evaluation.task_stage import TASKS_FILE
from pipeline.evaluation.tasks import budget_curves, latency_curves

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.engine.stage import StageContext

PROMPT_TITLES = {"step_by_step": "step by step", "answer_and_verify": "answer, then verify",
                 "budget_aware": "answer, then verify, budget stated (half of it)"}


def _quote(node: str) -> str:
    return '"' + node.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stage_graph(graph: list[list[Any]], tmp: Path, out: Path) -> None:
    """The recipe's stage graph drawn by Graphviz `dot` (left to right: inputs before users)."""
    lines = ["digraph kiln {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica", fontsize=10];']
    lines += [f"  {_quote(node)};" for node, _ in graph]
    lines += [f"  {_quote(src)} -> {_quote(node)};" for node, inputs in graph for src in inputs]
    dot = tmp / "graph.dot"
    dot.write_text("\n".join(lines + ["}"]) + "\n")
    run_tool([require_exe("dot"), "-Tsvg", dot, "-o", out])


def _summary(ctx: StageContext, p: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    rows = [["recipe", ctx.recipe_name], ["description", p["description"]], ["model", p["model"]],
            ["target", f"{p['target']}: {p['target_description']}"], ["scheme", p["scheme"]],
            ["context length", p["context_length"]],
            ["perplexity protocol", f"{reference['windows']} windows of {reference['window']} tokens of the evaluation "
                                    f"text, second halves scored ({reference['float']['tokens_scored']} tokens)"]]
    return ["<h2>Summary</h2>", key_values(rows)]


def _quality(ctx: StageContext, reference: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[str], list[dict]]:
    base = {**float_row(reference), "name": "float32 HF"}
    ranked = sorted([base, *({**r, "name": r["variant"]} for r in rows)], key=lambda r: r["ppl"])
    size_vs_ppl(ranked, ctx.out / "quality.svg", f"{ctx.recipe_name}: size on disk vs perplexity")
    cells = [quality_cells(r, base["ppl"], r["name"]) for r in ranked]
    body = ["<h2>Quality</h2>",
            "<p>Every variant scored on the same token ids by the same rule, with its own runtime's numerics; KL "
            "divergence and top-1 agreement against the float model's log-probabilities.</p>",
            table(QUALITY_HEADERS, cells,
                  numeric={2, 3, 4, 5, 6, 7}, caption="ranked by perplexity"),
            figure("quality.svg", "size on disk vs perplexity")]
    return body, ranked


def budget_rows(rows: dict[str, dict]) -> list[tuple[int, dict]]:
    """One prompt's {budget: figures} from tasks.json as (budget, figures), smallest budget first:
    the file is written with sorted keys, and "128" sorts before "32" as text. (Here, not in
    tasks.py: that module is part of every tasks stage's key.)"""
    return sorted((int(b), r) for b, r in rows.items())


def _tasks(ctx: StageContext, results: dict[str, dict], latency: dict | None) -> tuple[list[str], list[str]]:
    first = next(iter(results.values()))
    body = ["<h2>Task accuracy</h2>",
            f"<p>{esc(first['label'])}: {first['problems']} problems, answered greedily by {esc(first['runner'])}; the "
            "answer is the last \\boxed{} of the reply, else its last number. Prompts that state no budget are generated "
            "once and cut to each budget.</p>"]
    figures = []
    for prompt in first["prompts"]:
        name = f"tasks-{prompt}.svg"
        accuracy_curves(budget_curves(results, prompt), ctx.out / name, f"accuracy vs token budget: {PROMPT_TITLES[prompt]}",
                        "most generated tokens (budget)", list(results))
        figures.append(name)
        cells = [[t, *(f"{100 * r['accuracy']:.1f}% [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"
                       for _, r in budget_rows(res["accuracy"][prompt]))] for t, res in results.items()]
        body += [f"<h3>{esc(PROMPT_TITLES[prompt])}</h3>", figure(name, f"accuracy vs budget, {prompt}"),
                 table(["variant", *(f"{b} tokens" for b in first["budgets"])], cells,
                       numeric=set(range(1, len(first["budgets"]) + 1)), caption="accuracy [95% Wilson interval]")]
    if latency:
        body += ["<h2>Accuracy at equal latency</h2>",
                 f"<p>A budget of B tokens takes B / (the variant's speed) on the device; speeds from: "
                 f"{esc(latency['source'])}.</p>"]
        for prompt in first["prompts"]:
            curves, unit, missing = latency_curves(results, prompt, latency)
            if not curves:
                continue
            name = f"latency-{prompt}.svg"
            accuracy_curves(curves, ctx.out / name, f"accuracy at equal latency: {PROMPT_TITLES[prompt]}", unit,
                            list(results))
            figures.append(name)
            body.append(figure(name, f"accuracy vs latency, {prompt}"))
            if missing:
                body.append(f"<p>No device speed stated for {esc(', '.join(missing))}: left out.</p>")
    return body, figures


def write_report(ctx: StageContext) -> None:
    p = ctx.params
    reference = load_summary(ctx.inputs["reference"])
    rows = [read_quality(d) for n, d in ctx.inputs.items() if n.partition("@")[0].endswith(".perplexity")]
    loaded = [json.loads((d / TASKS_FILE).read_text()) for n, d in sorted(ctx.inputs.items())
              if n.partition("@")[0].endswith(".tasks")]
    results = {r["type"]: r for r in loaded}
    body = _summary(ctx, p, reference)
    quality, ranked = _quality(ctx, reference, rows)
    body += quality
    figures = ["quality.svg"]
    if results:
        tasks, more = _tasks(ctx, results, p["latency"])
        body += tasks
        figures += more
    stage_graph(p["graph"], ctx.tmp, ctx.out / "graph.svg")
    figures.append("graph.svg")
    body += ["<h2>Stage graph</h2>", figure("graph.svg", "the recipe's stage graph"),
             '<p>When it was built, what each stage cost, the action keys and device runs: <a href="build.html">build.html</a> '
             "(in the workspace, rewritten after every build; not in the bundle).</p>"]
    write_page(ctx.out / "index.html", f"{ctx.recipe_name}: evaluation report", body)
    (ctx.out / "evaluation.json").write_text(json.dumps({"quality": ranked, "tasks": results, "figures": figures},
                                                    indent=2, sort_keys=True) + "\n")
