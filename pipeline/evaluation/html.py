"""Static HTML pages: no JavaScript, every value escaped, images as files beside the page
(pipeline/evaluation/plots.py draws them)."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}th[scope=row]{text-align:left}caption{text-align:left;color:#555}
img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 .2em}"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset(), caption: str = "") -> str:
    """An HTML table; every cell escaped; columns in `numeric` right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{esc(c)}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_values(rows: list[list[Any]]) -> str:
    """A two-column table whose first column heads its row (no empty header row above it)."""
    body = "".join(f'<tr><th scope="row">{esc(k)}</th><td>{esc(v)}</td></tr>' for k, v in rows)
    return f"<table><tbody>{body}</tbody></table>"


def page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def figure(src: str, alt: str) -> str:
    return f'<p><img src="{esc(src)}" alt="{esc(alt)}"></p>'


def write_page(path: Path, title: str, body: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page(title, body), encoding="utf-8")
    tmp.replace(path)
