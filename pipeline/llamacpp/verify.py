"""llamacpp.verify: run the cross-built tools on each quantized GGUF under qemu-user:
a greedy completion of a fixed prompt (the RK3568 write-up's) and a small llama-bench.
Figures are labelled emulated: they say the binaries work, not how fast the board is."""
from __future__ import annotations

import json
import re
import shutil
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.errors import KilnError
from pipeline.engine.fields import Prompt
from pipeline.engine.proc import run_tool, threads
from pipeline.engine.stage import StageContext, Strict
from pipeline.llamacpp.common import BUILD, QUANTIZE, VERIFY, PerQuantType, device_build, gguf_in, quant_node, verify_params

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

SEED_PROMPT = "I believe the meaning of life is"


# llama.cpp's timing summary: "common_perf_print:        eval time =   17615.49 ms /     3 runs"
_DECODE_RUNS = re.compile(r"(?<!prompt )eval time =\s*[\d.]+ ms /\s*(\d+) runs")


def continuation(text: str, stderr: str, prompt: str) -> int:
    """Tokens llama-completion generated and fed back (its decode runs); fails when it generated
    nothing. A model may well sample tokens that print nothing (whitespace, special tokens: a shape
    rehearsal's random weights do), so the count, not the visible text, is the evidence; a first
    sampled token that ends generation (EOS) is never evaluated, so it does not count."""
    runs = _DECODE_RUNS.search(stderr)
    generated = int(runs.group(1)) if runs else 0
    if not text.strip().startswith(prompt[:20]) or not (generated or len(text.strip()) > len(prompt)):
        raise KilnError(f"llama-completion produced no continuation: {text!r}")
    return generated

class VerifyParams(Strict):
    prompt: Prompt = Field(SEED_PROMPT, description="Prompt of the greedy completion check.")
    n_predict: int = Field(32, ge=1, description="Tokens to generate (-n).")
    bench_prompt: int = Field(16, ge=0, description="llama-bench -p (prompt tokens).")
    bench_gen: int = Field(16, ge=0, description="llama-bench -n (generated tokens).")


def emulator(qemu_cpu: str) -> list[str]:
    qemu = shutil.which("qemu-aarch64-static")
    if qemu is None:
        raise KilnError("qemu-aarch64-static is not installed: run `sudo apt-get install qemu-user-static` (or `bash setup.sh`)")
    return [qemu, "-cpu", qemu_cpu]


class LlamacppVerify(PerQuantType):
    """Completion and bench of each quant type with the target's binaries (qemu)."""

    name = VERIFY
    version = 2  # 2: generated_tokens counts decode runs (an EOS sampled first is none)
    Params = VerifyParams
    tools = ("exe:qemu-aarch64-static",)

    @classmethod
    def inputs(cls, recipe: Recipe, variant: str) -> list[str]:
        return [quant_node(variant), device_build(recipe)]

    @classmethod
    def params(cls, recipe: Recipe, variant: str) -> dict[str, Any]:
        # -c: without it llama.cpp sizes the KV cache for the model's training context (131072 tokens
        # for Llama-3.1-8B: 16 GB, more than an RK3568 board has; docs/llamacpp.md#context-size)
        return {**verify_params(recipe, variant), "ctx": recipe.spec.context_length}

    def run(self, ctx: StageContext) -> None:
        p = ctx.params
        model = gguf_in(next(v for k, v in ctx.inputs.items() if k.startswith(QUANTIZE)))
        bin_dir = next(v for k, v in ctx.inputs.items() if k.startswith(BUILD)) / "bin"
        prefix = emulator(p["qemu_cpu"]) if p["arch"] == "aarch64" else []
        ctx.log.info(f"llama-completion: {p['n_predict']} tokens{' under qemu (emulated: ~1-2 tokens/s)' if prefix else ''}")
        done = run_tool([*prefix, bin_dir / "llama-completion", "-m", model, "-p", p["prompt"], "-n", p["n_predict"],
                         "-c", p["ctx"], "--temp", "0", "-s", "0", "-t", threads(), "-no-cnv"], capture=True, timeout=1800)
        text = done.stdout
        print(done.stderr[-2000:])
        generated = continuation(text, done.stderr, p["prompt"])
        bench = run_tool([*prefix, bin_dir / "llama-bench", "-m", model, "-p", p["bench_prompt"],
                          "-n", p["bench_gen"], "-r", "1", "-t", threads(), "-o", "json"], capture=True, timeout=1800)
        rows = json.loads(bench.stdout)
        figures = [{"test": "pp" if r["n_prompt"] else "tg", "tokens": r["n_prompt"] or r["n_gen"],
                    "tokens_per_s": round(r["avg_ts"], 3)} for r in rows]
        result = {"type": ctx.variant, "file": model.name, "prompt": p["prompt"], "completion": text,
                  "generated_tokens": generated,
                  "bench": figures, "label": f"emulated: qemu-aarch64-static -cpu {p['qemu_cpu']} on x86_64"}
        (ctx.out / "verify.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        ctx.log.info(f"{model.name} ({result['label']}): {text.strip()!r}; bench {figures}")
