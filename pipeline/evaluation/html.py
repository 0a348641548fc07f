"""Static HTML pages and their plots: no JavaScript, images as files beside the page (SVG from
matplotlib with a fixed hash salt and no date, so the same figures give the same bytes)."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}caption{text-align:left;color:#555}
img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 .2em}"""
BACKEND_COLORS = {"float": "#000000", "llama.cpp": "#1f77b4", "qnn": "#d62728", "mnn": "#2ca02c", "kuiper": "#9467bd"}


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset(), caption: str = "") -> str:
    """An HTML table; every cell escaped; columns in `numeric` right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{esc(c)}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def figure(src: str, alt: str) -> str:
    return f'<p><img src="{esc(src)}" alt="{esc(alt)}"></p>'


def write_page(path: Path, title: str, body: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page(title, body), encoding="utf-8")
    tmp.replace(path)


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
