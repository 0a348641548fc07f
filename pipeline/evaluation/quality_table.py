"""The quality table as people read it (Markdown for terminals and report.md, cells for HTML).

Apart from pipeline/evaluation/quality.py on purpose: that module is in every perplexity stage's
key, and a change of presentation must not re-run a perplexity."""
from __future__ import annotations

from typing import Any

QUALITY_HEADERS = ["variant", "runs on", "size (MiB)", "PPL", "±", "Δ vs float", "KLD vs float", "same top-1"]


def _num(value: float | None, digits: int, unit: str = "") -> str:
    if value is None:
        return "—"
    # the float row's KLD is float32 rounding of log-probs, a hair either side of zero: no "-0.00000"
    return f"{0.0 if round(value, digits) == 0 else value:.{digits}f}{unit}"


def quality_cells(r: dict[str, Any], float_ppl: float | None, name: str | None = None) -> list[str]:
    """One row of the quality table (QUALITY_HEADERS), for Markdown and HTML alike."""
    delta = "—" if not float_ppl or r["backend"] == "float" else f"{(r['ppl'] / float_ppl - 1) * 100:+.2f}%"
    return [name or r["variant"], r["label"], f"{r['size_bytes'] / 2**20:.1f}", f"{r['ppl']:.4f}",
            _num(r.get("ppl_err"), 4), delta, _num(r.get("kld"), 5), _num(r.get("same_top_pct"), 2, "%")]


def quality_table(rows: list[dict[str, Any]], float_ppl: float | None = None) -> str:
    """Markdown, best perplexity first; Δ against the float reference when given."""
    lines = ["| " + " | ".join(QUALITY_HEADERS) + " |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(quality_cells(r, float_ppl)) + " |" for r in sorted(rows, key=lambda r: r["ppl"])]
    return "\n".join(lines)
