"""mnn.export: MNN's `llmexport` (PyPI) on the model stage's HF checkpoint → llm.mnn,
llm.mnn.weight, tokenizer.mtok, llm_config.json (MNN's llmexport guide).

Quantization comes from the scheme: weights.bits (4 or 8) → --quant_bit, per-block block_size or
per-channel (0) → --quant_block, symmetric → --sym. llmexport runs in Kiln's sandbox (no network,
no pip: MNN's tools try both), as a script so its own package dir is on sys.path (`python -m
llmexport` fails with `No module named 'utils'`). Its exit code is not trusted: the outputs and its
log are checked. Three of its quirks are handled here:
- a block size that does not divide the hidden size makes it quantize the tied embedding with
  another block than llm_config.json records, and the model emits garbage (docs/mnn.md#quant_block): refused
  before the export, unless `seperate_embed` keeps the embedding out of quantization;
- a WordLevel/WordPiece tokenizer is exported as its special tokens alone (MNN then crashes):
  refused;
- llm.mnn carries a random `mnn_uuid`: replaced by one derived from the stage key, so the same
  inputs give the same bytes.
`config.json` (runtime settings) is not this stage's: mnn.config renders it.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
from pydantic import Field

from pipeline.engine.errors import KilnError
from pipeline.engine.sandbox import run_sandboxed
from pipeline.engine.stage import Stage, StageContext, Strict
from pipeline.mnn.runtime import EXPORT, RUNTIME, export_params

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

OUTPUTS = ("llm.mnn", "llm.mnn.weight", "tokenizer.mtok", "llm_config.json")


class MnnExportParams(Strict):
    embed_bit: int = Field(16, description="Embedding table precision (--embed_bit): 16 (bf16), 8 or 4.")
    seperate_embed: bool = Field(False, description="Keep a tied embedding out of quantization as a separate bf16 "
                                 "file (--seperate_embed); needed when the block size does not divide the hidden size.")
    lm_quant_bit: int | None = Field(None, description="lm_head bits (--lm_quant_bit); default: the scheme's.")
    timeout_s: int = Field(3600, ge=60, description="Give up on llmexport after this many seconds.")


def llmexport_script() -> Path:
    from importlib.util import find_spec

    spec = find_spec("llmexport")
    if spec is None or not spec.submodule_search_locations:
        raise KilnError("llmexport is not installed: run `bash setup.sh` (installs mnn and llmexport into .venv)")
    return Path(next(iter(spec.submodule_search_locations))) / "llmexport.py"


def divisors(n: int, at_least: int = 16) -> list[int]:
    return [d for d in range(at_least, n + 1) if n % d == 0]


def check_block(p: dict[str, Any], config: dict[str, Any], recipe: str) -> None:
    """Refuse a block size llmexport would silently get wrong on this model."""
    block, hidden = p["quant_block"], config["hidden_size"]
    tied = config.get("tie_word_embeddings", False)
    if block and hidden % block and tied and not p["seperate_embed"]:
        raise KilnError(
            f"recipe {recipe}: scheme.weights.block_size {block} does not divide {p['model']}'s hidden_size "
            f"{hidden}: llmexport would quantize the tied embedding with another block than llm_config.json "
            f"records, and the exported model emits garbage. Use a block size that divides {hidden} "
            f"({', '.join(map(str, divisors(hidden)[:6]))}, ...), per-channel weights, or set "
            f"`stages.mnn.export.seperate_embed: true`.")


def check_tokenizer(model_dir: Path) -> None:
    """llmexport writes BPE and SentencePiece vocabularies; for others it writes a tokenizer.mtok
    with the special tokens only, and MNN's engine crashes (SIGSEGV) loading it."""
    if (model_dir / "tokenizer.model").exists() or not (model_dir / "tokenizer.json").exists():
        return
    kind = json.loads((model_dir / "tokenizer.json").read_text()).get("model", {}).get("type")
    if kind not in ("BPE", "Unigram", None):
        raise KilnError(f"{model_dir / 'tokenizer.json'}: a {kind} tokenizer: llmexport exports BPE and SentencePiece "
                        f"tokenizers only (it would write the special tokens alone, and MNN crashes loading them)")


def set_uuid(mnn_file: Path, weights: Path) -> str:
    """Replace llm.mnn's random mnn_uuid (a 36-character string in the flatbuffer) in place by one
    derived from the export's own bytes (graph with the uuid blanked, and the weights): rebuilt
    from the same inputs it is the same file, and it never names the action key."""
    import MNN

    old = MNN.get_model_uuid(str(mnn_file))
    data = mnn_file.read_bytes()
    if not old or data.count(old.encode()) != 1:
        raise KilnError(f"{mnn_file.name}: cannot find its mnn_uuid {old!r} exactly once")
    content = blake3.blake3(data.replace(old.encode(), b"0" * len(old)))
    content.update_mmap(weights)
    new = str(uuid.uuid5(uuid.NAMESPACE_URL, f"kiln:mnn:{content.hexdigest()}"))
    mnn_file.write_bytes(data.replace(old.encode(), new.encode()))
    return new


def quant_flags(p: dict[str, Any]) -> list[str]:
    flags = ["--quant_bit", str(p["quant_bit"]), "--quant_block", str(p["quant_block"]), "--embed_bit", str(p["embed_bit"])]
    flags += ["--sym"] * p["sym"] + ["--seperate_embed"] * p["seperate_embed"]
    return flags + (["--lm_quant_bit", str(p["lm_quant_bit"])] if p["lm_quant_bit"] else [])


class MnnExport(Stage):
    """llmexport → MNN model, weights, tokenizer and llm_config.json."""

    name = EXPORT
    version = 1
    Params = MnnExportParams
    tools = ("python", "mnn", "llmexport", "torch", "transformers", "onnx")
    resource = "heavy"
    runtimes = (RUNTIME,)

    requires = ("model",)

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        return export_params(recipe)

    @classmethod
    def ships(cls, recipe: Recipe, variant: str = "") -> str | None:
        return "."

    def run(self, ctx: StageContext) -> None:
        p = ctx.params
        model_dir = ctx.inputs["model"]
        check_block(p, json.loads((model_dir / "config.json").read_text()), ctx.recipe_name)
        check_tokenizer(model_dir)
        work = ctx.tmp / "llmexport"
        work.mkdir()
        flags = quant_flags(p)
        argv = [sys.executable, llmexport_script(), "--path", model_dir, "--export", "mnn", "--dst_path", work / "model",
                # never the default ../../../build/MNNConvert: llmexport runs that through a shell;
                # a path that does not exist makes it use the converter inside pymnn
                "--mnnconvert", work / "no-such-mnnconvert", *flags]
        ctx.log.info(f"llmexport: {p['quant_bit']}-bit weights, block {p['quant_block'] or 'per-channel'}")
        run_sandboxed(argv, what="llmexport", cwd=work, timeout=p["timeout_s"])
        produced = work / "model"
        log = (work / ".export.log").read_text(errors="replace") if (work / ".export.log").exists() else ""
        missing = [f for f in OUTPUTS if not (produced / f).is_file() or (produced / f).stat().st_size == 0]
        if missing or re.search(r"(?i)convert(ed)? failed", log):
            raise KilnError(f"llmexport exited 0 but did not export the model: missing {missing or 'nothing'}; "
                            f"converter log: {log.strip()[-800:] or '(empty)'}")
        for f in OUTPUTS:
            shutil.move(produced / f, ctx.out / f)
        llm_config = json.loads((ctx.out / "llm_config.json").read_text())
        tie = llm_config.get("tie_embeddings")
        if tie and p["quant_block"] and tie[-1] != p["quant_block"]:
            raise KilnError(f"llm_config.json records tie_embeddings block {tie[-1]}, not {p['quant_block']}")
        export = {"uuid": set_uuid(ctx.out / "llm.mnn", ctx.out / "llm.mnn.weight"), "flags": flags,
                  "quant_bit": p["quant_bit"], "quant_block": p["quant_block"], "sym": p["sym"],
                  "sizes": {f: (ctx.out / f).stat().st_size for f in OUTPUTS}}
        (ctx.out / "export.json").write_text(json.dumps(export, indent=2, sort_keys=True) + "\n")
        ctx.log.info("exported " + ", ".join(f"{f} {n / 1e6:.1f} MB" for f, n in export["sizes"].items()))
