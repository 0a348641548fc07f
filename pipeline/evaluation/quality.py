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
