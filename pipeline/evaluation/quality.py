"""A backend's perplexity result in the one shape every backend writes (`perplexity.json`), and
the table that ranks them."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

QUALITY_FILE = "perplexity.json"
STAT_FIELDS = ("ppl", "ppl_err", "kld", "kld_err", "same_top_pct", "same_top_err_pct", "rms_dp_pct", "tokens_scored")


def quality_row(backend: str, variant: str, label: str, file: str, size_bytes: int, stats: dict[str, Any],
                protocol: dict[str, Any]) -> dict[str, Any]:
    """One variant's figures: what ran (backend, label), what it weighs on disk, the protocol's
    statistics (missing ones None: a backend that gives no logits has no KL divergence)."""
    return {"backend": backend, "variant": variant, "label": label, "file": file, "size_bytes": size_bytes,
            "window": protocol["window"], "windows": protocol["windows"],
            **{k: stats.get(k) for k in STAT_FIELDS}}


def float_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The float reference as a row of the table (its KLD is the 16-bit rounding of the stored log-probs)."""
    return quality_row("float", "float", "float32 HF model, torch (host)", "model.safetensors",
                       summary["float"]["size_bytes"], summary["float"], summary)


def write_quality(out: Path, row: dict[str, Any]) -> None:
    (out / QUALITY_FILE).write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")


def read_quality(out: Path) -> dict[str, Any]:
    return json.loads((out / QUALITY_FILE).read_text())


QUALITY_HEADERS = ["variant", "runs on", "size (MiB)", "PPL", "±", "Δ vs float", "KLD vs float", "same top-1"]


def _num(value: float | None, digits: int, unit: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{unit}"


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
