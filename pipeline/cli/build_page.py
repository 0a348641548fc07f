"""The report's unshipped page: `artifacts/<recipe>/report/build.html`, rewritten after every
build beside the report stage's index.html. It holds what changes from build to build and so
must stay out of the reproducible bundle: when it was built, each stage's action key, state and
cost (wall, CPU, peak RSS, bytes, host), and the device runs filed with `python -m pipeline perf`."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from pipeline.cli.costs import cost_rows
from pipeline.engine.cost import human_bytes
from pipeline.engine.plan import StageSpec, resolve
from pipeline.engine.settings import Settings
from pipeline.evaluation.html import esc, table, write_page

BUILD_PAGE = "build.html"


def _when(timestamp: float | None) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S") if timestamp else ""


def _device_runs(folder: Path) -> list[list[str]]:
    rows = []
    for path in sorted(folder.glob("*.json")):
        try:
            run = json.loads(path.read_text())
            rows += [[run["label"], q["prompt_tokens"], f"{q['prompt_tokens_per_s']:.1f}", q["generated_tokens"],
                      f"{q['generated_tokens_per_s']:.2f}"] for q in run["queries"]]
        except (ValueError, KeyError, TypeError):
            rows.append([path.name, "unreadable", "", "", ""])
    return rows


def write_build_page(recipe: str, specs: list[StageSpec], settings: Settings) -> Path | None:
    """build.html beside the recipe's report/index.html; None when the recipe has no report."""
    folder = settings.artifacts / recipe / "report"
    if not folder.is_dir():
        return None
    cells = []
    for r in cost_rows(resolve(specs)):
        c = r["cost"] or {}
        cells.append([r["stage"], r["key"][:12], r["state"], f"{c['wall_s']:.1f}" if c else "—",
                      f"{c['cpu_s']:.1f}" if c else "—", human_bytes(c["peak_rss_bytes"]) if c else "—",
                      human_bytes(c["output_bytes"]) if c else "—", r["host"] or "", _when(r["start"])])
    body = [f"<p>Page written {esc(_when(datetime.datetime.now(datetime.UTC).timestamp()))} UTC, after a build of "
            f"{esc(recipe)}. The evaluation itself: <a href=\"index.html\">index.html</a>.</p>",
            "<h2>Stages</h2>",
            table(["stage", "action key", "state", "wall s", "CPU s", "peak RSS", "output", "built on", "started (UTC)"],
                  cells, numeric={3, 4, 5, 6})]
    device = _device_runs(settings.artifacts / recipe / "device")
    body += ["<h2>Device runs</h2>",
             table(["run", "prompt tokens", "prompt tok/s", "generated tokens", "generation tok/s"], device, numeric={1, 2, 3, 4})
             if device else "<p>None filed (<code>python -m pipeline perf RECIPE perf.json --label NAME</code>).</p>"]
    page = folder / BUILD_PAGE
    write_page(page, f"{recipe}: build details", body)
    return page
