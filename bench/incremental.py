"""Incremental minimality: for each tweak, the stages Kiln rebuilds vs the minimal set.

Run: .venv/bin/python bench/incremental.py [--recipe smollm2_135m_sm8750] [--tweaks comment:qnn.quantize,...]
     .venv/bin/python bench/incremental.py --recipe smollm2_135m_rk3568

The minimal set of a tweak is the stages it touches directly (their key material other than the
inputs changed: code, params, tools) plus the stages whose inputs' bytes changed (an input's
output digest differs from the one the previous build read). Everything else must be kept.
Printed per tweak: both sets, what strict key chaining (every stage downstream of a touched one,
as doit, DVC and Olive do) would rebuild, and the ratio rebuilt / minimal (1.00 = minimal).

Tweaks (each applied to the baseline, built, measured, then reverted):
  comment:<stage>  a comment appended to the stage's module (in a copy of the checkout)
  tool:<name>      the tool's version string gets ".post1" (as a patch release would)
  sampler          qnn.genie_config's sampler temperature 0.8 → 0.6
  quant            the llama.cpp recipe's quant types: Q8_0 replaced by Q5_K_M (the primary Q4_K_M unchanged)

The recipe is built as `bench_<recipe>` (it extends the real one) in a workspace under --dir,
sharing the store of this checkout (KILN_STORE or pyproject), so the baseline is mostly hits.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.checkout import copy_checkout  # noqa: E402  (imports nothing of Kiln)

# qnn.quantize's comment edit (5-6 min of GPTQ here) is shown in docs/store.md; the bench's is a cheaper stage
DEFAULT_TWEAKS = {"smollm2_135m_sm8750": "comment:qnn.genie_config,tool:jinja2,sampler",
                  "smollm2_135m_rk3568": "comment:llamacpp.convert,tool:gguf,quant"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2_135m_sm8750")
    ap.add_argument("--tweaks", help="comma-separated (default: the recipe's list above)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kiln-incremental"))
    a = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    tweaks = (a.tweaks or DEFAULT_TWEAKS.get(a.recipe, "")).split(",")
    shutil.rmtree(a.dir, ignore_errors=True)
    checkout = copy_checkout(a.dir / "checkout")
    recipes = a.dir / "recipes"
    shutil.copytree(here / "recipes", recipes)
    store = os.environ.get("KILN_STORE") or str(_store_of(here))
    os.environ.update(KILN_RECIPES=str(recipes), KILN_ARTIFACTS=str(a.dir / "artifacts"), KILN_STORE=store)
    sys.path.insert(0, str(checkout))  # `pipeline` is the copy's from here on
    run(a.recipe, tweaks, checkout, recipes)


def _store_of(checkout: Path) -> Path:
    sys.path.insert(0, str(checkout))
    from pipeline.engine.settings import Settings

    path = Settings.from_env().store_dir()
    sys.path.remove(str(checkout))
    for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
        del sys.modules[name]  # the copy's modules are imported next
    return path


def run(recipe: str, tweaks: list[str], checkout: Path, recipes: Path) -> None:
    from pipeline.engine import tools
    from pipeline.engine.plan import plan
    from pipeline.engine.runner import build, downstream, workspace_mark
    from pipeline.engine.settings import Settings
    from pipeline.engine.store import Store
    from pipeline.registry import load_recipe

    settings = Settings.from_env()
    name = f"bench_{recipe}"
    base = f"extends: {recipe}\n"
    quant = "scheme: {use: gguf_q4_k_m, gguf_types: [Q4_K_M, Q2_K, Q5_K_M]}\n"

    def build_all() -> list[str]:
        specs = plan(load_recipe(name, settings))
        return [s.stage for s in specs if build(s, specs, settings) == "built"]

    def state() -> dict[str, dict]:
        """{stage: the action record of what its workspace holds}."""
        specs = plan(load_recipe(name, settings))
        out = {}
        for s in specs:
            key = workspace_mark(s).get("key")
            out[s.stage] = (Store(s.store).record(key) or {}) if key else {}
        return out

    (recipes / f"{name}.yaml").write_text(base)
    t0 = time.monotonic()
    print(f"baseline {name}: built {build_all() or 'nothing (all hits)'} in {time.monotonic() - t0:.0f} s", flush=True)
    real_fingerprint = tools.fingerprint
    rows = []
    for tweak in tweaks:
        kind, _, arg = tweak.partition(":")
        before = state()
        undo = None
        if kind == "comment":
            module = next(s for s in plan(load_recipe(name, settings)) if s.stage == arg).entry.partition(":")[0]
            source = checkout.joinpath(*module.split(".")).with_suffix(".py")
            text = source.read_text()
            source.write_text(text + "# bench: a comment, nothing else\n")
            undo = lambda s=source, t=text: s.write_text(t)  # noqa: E731
        elif kind == "tool":
            tools.fingerprint = lambda t, n=arg: real_fingerprint(t) + (".post1" if t == n else "")
            undo = lambda: setattr(tools, "fingerprint", real_fingerprint)  # noqa: E731
        elif kind == "sampler":
            (recipes / f"{name}.yaml").write_text(base + "stages: {qnn.genie_config: {sampler: {temp: 0.6}}}\n")
        elif kind == "quant":
            (recipes / f"{name}.yaml").write_text(base + quant)
        else:
            raise SystemExit(f"unknown tweak {tweak!r}")
        t0 = time.monotonic()
        rebuilt = build_all()
        seconds = time.monotonic() - t0
        after = state()
        touched, fed = [], []
        for stage, rec in after.items():
            old = before.get(stage) or {}
            if not old:  # a stage the tweak added (a new quant type): touched by definition
                touched.append(stage)
                continue
            static = lambda r: {k: v for k, v in r["material"].items() if k != "inputs"}  # noqa: E731
            if static(rec) != static(old):
                touched.append(stage)
            elif rec["material"]["inputs"] != old["material"]["inputs"]:
                fed.append(stage)
        minimal = touched + fed
        specs = plan(load_recipe(name, settings))
        strict = set(touched) | {d.stage for t in touched for d in downstream(t, specs)}
        rows.append((tweak, rebuilt, minimal, sorted(strict), seconds))
        print(f"\n{tweak}: rebuilt {len(rebuilt)} in {seconds:.0f} s: {rebuilt}\n"
              f"  minimal {len(minimal)}: touched {touched}, inputs' bytes changed {fed}\n"
              f"  strict key chaining would rebuild {len(strict)}: {sorted(strict)}\n"
              f"  ratio rebuilt/minimal: {len(rebuilt) / max(1, len(minimal)):.2f}"
              f"{'' if set(rebuilt) == set(minimal) else '  (SETS DIFFER)'}", flush=True)
        if undo:
            undo()
        (recipes / f"{name}.yaml").write_text(base)
        build_all()  # back to the baseline: all hits
    print("\n| tweak | rebuilt | minimal | strict chaining | ratio | seconds |\n|---|---:|---:|---:|---:|---:|")
    for tweak, rebuilt, minimal, strict, seconds in rows:
        print(f"| {tweak} | {len(rebuilt)} | {len(minimal)} | {len(strict)} | "
              f"{len(rebuilt) / max(1, len(minimal)):.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
