"""text: calibration and held-out evaluation text as plain UTF-8 files.

Sources are Debian's public-domain KJV Bible (read with the `bible` program
of package bible-kjv, installed by setup.sh), local files, or dataset files
in the local Hugging Face cache (.txt, .jsonl, .json). The two slices
must not overlap: any shared line of 40+ characters is an error.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import KilnError
from pipeline.engine.proc import run_tool
from pipeline.engine.stage import NoParams, Stage, StageContext
from pipeline.generic.hfcache import hf_cache_dir, repo_folder, snapshot

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

ROLES = ("calibration", "evaluation")
KJV_DATA = Path("/usr/lib/bible.data")  # installed by bible-kjv-text (a bible-kjv dependency)
_VERSE = re.compile(r"^\s*\d+\s+")
_HEADING = re.compile(r"^[1-3]?\s*[A-Z][A-Za-z ]+ \d+$")


def kjv_text(spec: str) -> str:
    """Verses of `spec` as prose: one verse a line, no chapter headings or verse numbers."""
    out = run_tool(["bible", "-l0", spec], capture=True).stdout
    lines = [_VERSE.sub("", line).strip() for line in out.splitlines()]
    return "\n".join(line for line in lines if line and not _HEADING.match(line)) + "\n"


def read_text(path: Path, field: str) -> str:
    """A .txt file as is; .jsonl / .json records joined by their `field`, one per line."""
    suffix = path.suffix.lower()
    raw = path.read_text(encoding="utf-8")
    if suffix in (".txt", ".md", ""):
        return raw
    if suffix == ".jsonl":
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif suffix == ".json":
        data = json.loads(raw)
        records = data.get("data", data.get("rows", [])) if isinstance(data, dict) else data
    else:
        raise KilnError(f"{path.name}: unsupported text format {suffix!r} (use .txt, .jsonl or .json)")
    try:
        return "\n".join(str(r[field]) for r in records if str(r[field]).strip()) + "\n"
    except (KeyError, TypeError):
        raise KilnError(f"{path.name}: records have no field {field!r} (set text.<role>.field)") from None


def overlap(a: str, b: str, min_len: int = 40) -> set[str]:
    long_lines = lambda t: {line.strip() for line in t.splitlines() if len(line.strip()) >= min_len}  # noqa: E731
    return long_lines(a) & long_lines(b)


class Text(Stage):
    """Calibration/evaluation text; settings live in the recipe's top-level `text:` section."""

    name = "text"
    version = 2  # 2: text.json holds the text's size only, not its source spec
    Params = NoParams

    runtimes = ("llama.cpp", "genie", "mnn", "kuiper")  # those whose stages calibrate or evaluate on text

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role in ROLES:
            src = getattr(recipe.spec.text, role)
            if src.kjv:
                out[role] = {"kjv": src.kjv}
            else:  # the content enters the key through sources(); the format through the suffix
                out[role] = {"format": Path(src.file or src.path or "").suffix, "field": src.field}
        return out

    @classmethod
    def sources(cls, recipe: Recipe, variant: str = "") -> dict[str, Path]:
        out: dict[str, Path] = {}
        for role in ROLES:
            src = getattr(recipe.spec.text, role)
            if src.kjv:
                out[role] = KJV_DATA
            elif src.file:
                out[role] = recipe.resolve_path(src.file)
                if not out[role].is_file():
                    raise KilnError(f"{recipe.where('text', role, 'file')}: text.{role}.file: {out[role]} is not a file")
            else:
                snap = snapshot(src.hf_dataset, src.revision, "dataset")
                if snap is None or not (snap / src.path).is_file():
                    raise KilnError(
                        f"{recipe.where('text', role)}: text.{role}: {src.path} of dataset {src.hf_dataset!r} is not "
                        f"in the local Hugging Face cache ({hf_cache_dir()}); on a machine with hub access run "
                        f"`hf download --repo-type dataset {src.hf_dataset} {src.path}` and copy the cache folder "
                        f"{repo_folder(src.hf_dataset, 'dataset')} here, or use `file:`")
                out[role] = snap / src.path
        return out

    @classmethod
    def tool_names(cls, recipe: Recipe, variant: str = "") -> tuple[str, ...]:
        t = recipe.spec.text
        return ("deb:bible-kjv",) if (t.calibration.kjv or t.evaluation.kjv) else ()

    def run(self, ctx: StageContext) -> None:
        texts = {}
        for role in ROLES:
            spec = ctx.params[role]
            texts[role] = kjv_text(spec["kjv"]) if "kjv" in spec else read_text(ctx.sources[role], spec["field"])
            if len(texts[role]) < 1000:
                raise KilnError(f"{role} text has only {len(texts[role])} characters; give a larger range or file")
        shared = overlap(texts["calibration"], texts["evaluation"])
        if shared:
            raise KilnError(f"calibration and evaluation text overlap ({len(shared)} shared lines, e.g. "
                            f"{next(iter(shared))[:60]!r}); choose disjoint ranges")
        summary = {}
        for role, text in texts.items():
            (ctx.out / f"{role}.txt").write_text(text, encoding="utf-8")
            # what the text is, not where it came from: another range or file with the same lines
            # gives the same output (the source spec is in the action record)
            summary[role] = {"chars": len(text), "lines": text.count("\n")}
        (ctx.out / "text.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        ctx.log.info(f"text: {json.dumps({r: {**ctx.params[r], **v} for r, v in summary.items()}, sort_keys=True)}")
