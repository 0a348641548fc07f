"""The evaluation plots, as SVG files: matplotlib (Agg) with a fixed hash salt and no date in the
metadata, so the same figures give the same bytes (a report that ships must be reproducible)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

BACKEND_COLORS = {"float": "#000000", "llama.cpp": "#1f77b4", "qnn": "#d62728", "mnn": "#2ca02c", "kuiper": "#9467bd"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "kiln"  # stable element ids: same figure, same bytes
    import matplotlib.pyplot as plt

    return plt


def save_svg(fig: Any, path: Path) -> None:
    fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")
    _pyplot().close(fig)


def size_vs_ppl(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Size on disk (log scale) against perplexity, one labelled point per variant, the float
    model's perplexity as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        color = BACKEND_COLORS.get(r["backend"], "#7f7f7f")
        mib = r["size_bytes"] / 2**20
        ax.scatter(mib, r["ppl"], color=color, zorder=3)
        if r.get("ppl_err"):
            ax.errorbar(mib, r["ppl"], yerr=r["ppl_err"], color=color, alpha=0.3, zorder=2)
        ax.annotate(r["name"], (mib, r["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if r["backend"] == "float":
            ax.axhline(r["ppl"], color=color, linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (MiB, log scale)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    save_svg(fig, path)


def _curves(ax: Any, curves: dict[str, list[tuple[float, float, float, float]]], variants: list[str]) -> None:
    """One line per name through (x, accuracy, ci low, ci high) points, the interval shaded; a
    variant's colour is its place in `variants` (the page's every variant), so it keeps its
    colour in a plot that leaves another out."""
    for name, points in curves.items():
        xs, ys, lo, hi = zip(*sorted(points), strict=True)
        color = f"C{variants.index(name) % 10}"
        ax.plot(xs, [100 * y for y in ys], marker="o", label=name, color=color)
        ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi], alpha=0.12, color=color)
    ax.set_ylabel("accuracy (%), 95% interval shaded")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def accuracy_curves(curves: dict[str, list[tuple[float, float, float, float]]], path: Path, title: str,
                    xlabel: str, variants: list[str], log_x: bool = True) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _curves(ax, curves, variants)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    save_svg(fig, path)
