"""reproduce: rebuild a recipe's stages in an empty temporary store and compare every output file
with the stored entry; name the first differing file and byte offset per stage."""
from __future__ import annotations

import re
import uuid
from dataclasses import replace
from pathlib import Path

from pipeline.engine.errors import KilnError
from pipeline.engine.lock import HOST
from pipeline.engine.materialize import link_tree
from pipeline.engine.plan import StageSpec, plan
from pipeline.engine.runner import run_and_publish, say
from pipeline.engine.settings import Settings
from pipeline.engine.store import Store, output_files, remove_tree
from pipeline.registry import load_recipe

_CHUNK = 1 << 20
_TIMESTAMP = re.compile(rb"(19|20)\d\d-\d\d-\d\d|\b1[6-9]\d{8}(\.\d+)?\b")
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PATH = re.compile(rb"/(tmp|home|root|work|scratch)/")
_TIMING = re.compile(rb"second|elapsed|duration|_s\"|_ms\"|per_s|timing", re.I)
_BINARY = (".bin", ".onnx", ".data", ".gguf", ".safetensors", ".weight", ".mnn")


def first_difference(a: Path, b: Path) -> int | None:
    """Byte offset of the first difference between two files (the shorter's length when one is a
    prefix of the other), None when they are equal."""
    offset = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(_CHUNK), fb.read(_CHUNK)
            if x != y:
                n = min(len(x), len(y))
                return offset + next((i for i in range(n) if x[i] != y[i]), n)
            if not x:
                return None
            offset += len(x)


def hint(name: str, stored: bytes, rebuilt: bytes) -> str:
    """A guess at why bytes around the first difference differ."""
    both = stored + b"\n" + rebuilt
    if _UUID.search(both):
        return "a random id? (derive it from the content)"
    if _TIMESTAMP.search(both):
        return "a timestamp? (write it to ctx.info, or derive it from SOURCE_DATE_EPOCH)"
    if _TIMING.search(both):
        return "a timing? (measurements of the run go to ctx.info)"
    if _PATH.search(both):
        return "a path? (scratch and workspace paths differ per build; write relative names)"
    if name.endswith(_BINARY):
        return "float order? (threaded reductions, a different thread count or device, unseeded randomness)"
    return "unknown: compare the two files"


def compare(stored: Path, rebuilt: Path) -> list[str]:
    """Differences between two outputs' `out/` trees, one line per file, first the earliest."""
    old, new = ({p.relative_to(root).as_posix() for p in output_files(root)} for root in (stored, rebuilt))
    lines = [f"{rel}: only in the stored output" for rel in sorted(old - new)]
    lines += [f"{rel}: only in the rebuilt output" for rel in sorted(new - old)]
    for rel in sorted(old & new):
        offset = first_difference(stored / rel, rebuilt / rel)
        if offset is not None:
            window = slice(max(0, offset - 160), offset + 48)  # the key a JSON value sits under is before it
            a, b = (stored / rel).read_bytes()[window], (rebuilt / rel).read_bytes()[window]
            lines.append(f"{rel}: differs at byte {offset} (hint: {hint(rel, a, b)})")
    return lines


def _seed(temp: Store, store: Store, digest: str) -> None:
    """Put a stored output into the temporary store (hard links where the filesystem allows)."""
    if not temp.has_output(digest):
        link_tree(store.output(digest), temp.output(digest), ("hardlink", "copy"))


def reproduce(recipe_name: str, settings: Settings, stages: list[str] | None = None) -> dict[str, list[str]]:
    """{stage: differences ([] = identical)} for the chosen stages (default: all), each rebuilt from
    its stored inputs in a fresh store beside the real one."""
    specs = plan(load_recipe(recipe_name, settings))
    by_id = {s.stage: s for s in specs}
    unknown = [s for s in stages or [] if s not in by_id]
    if unknown:
        raise KilnError(f"reproduce: {', '.join(unknown)} not in recipe {recipe_name} (its stages: {', '.join(by_id)})")
    missing = [s.stage for s in specs if s.output is None and (not stages or s.stage in stages)]
    if missing:
        raise KilnError(f"reproduce: {', '.join(missing)} not built in the store; run `doit recipe={recipe_name}` first")
    chosen = [s for s in specs if not stages or s.stage in stages]
    store = Store(specs[0].store)
    # under the store's scratch: same filesystem (inputs are hard-linked), and gc clears it if we die
    root = store.root / "scratch" / f"reproduce.{HOST}.{uuid.uuid4().hex[:8]}"
    report: dict[str, list[str]] = {}
    try:
        temp = Store(root / "store")
        for spec in chosen:
            for digest in (spec.inputs or {}).values():
                _seed(temp, store, digest)
            say(f"reproduce: {spec.stage}: rebuilding in an empty store")
            trial: StageSpec = replace(spec, store=temp.root)  # a failure's log still lands in the workspace's logs/
            lock = temp.lock(spec.key)
            lock.acquire()
            try:
                digest = run_and_publish(trial, temp, settings)
            finally:
                lock.release()
            assert spec.output is not None
            report[spec.stage] = [] if digest == spec.output else compare(store.out(spec.output), temp.out(digest))
            verdict = "identical" if not report[spec.stage] else "DIFFERS: " + "; ".join(report[spec.stage][:3])
            say(f"reproduce: {spec.stage}: {verdict}")
    finally:
        remove_tree(root)
    return report


def summary(recipe_name: str, report: dict[str, list[str]]) -> str:
    same = [s for s, d in report.items() if not d]
    lines = [f"reproduce {recipe_name}: {len(same)} of {len(report)} stages identical"]
    lines += [f"  {stage}: {'identical' if not diffs else diffs[0]}" for stage, diffs in report.items()]
    lines += [f"    {d}" for diffs in report.values() for d in diffs[1:6]]
    return "\n".join(lines)


def _main(args, settings: Settings) -> int:
    name = args.recipe or settings.default_recipe
    stages = [s for s in (args.stages or "").split(",") if s] or None
    report = reproduce(name, settings, stages)
    print(summary(name, report))
    return 1 if any(report.values()) else 0


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help=__doc__)
    p.add_argument("recipe", nargs="?", help="recipe name (default: pyproject's default_recipe)")
    p.add_argument("--stages", help="comma-separated stage ids (default: every stage of the recipe)")
    p.set_defaults(func=_main)
