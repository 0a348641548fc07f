"""MNN's LLM runtime from Python (pymnn's MNN.llm): config.json rendering, loading an export,
greedy decoding with timings. Shared by mnn.config and verify.mnn."""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KilnError
from .templating import render

CONFIG_TEMPLATE = "mnn/config.json.j2"
# Where config.json points, relative to its own directory (MNN's base_dir): mnn.export's files.
EXPORT_FILES = {"llm_model": "llm.mnn", "llm_weight": "llm.mnn.weight", "tokenizer_file": "tokenizer.mtok"}


def render_config(runtime: dict[str, Any]) -> dict[str, Any]:
    """config.json from the runtime settings (mnn.config's params), parsed back to check it is JSON."""
    text = render(CONFIG_TEMPLATE, files=EXPORT_FILES, **runtime)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise KilnError(f"{CONFIG_TEMPLATE} rendered invalid JSON: {e}") from None


@contextmanager
def loaded(export_dir: Path, config: dict[str, Any], into: Path) -> Iterator["MnnLlm"]:
    """The export loaded by MNN's engine with `config`: its files (linked) and config.json laid
    out in `into` as on the device, removed again afterwards."""
    from .materialize import link_or_copy

    into.mkdir(parents=True)
    try:
        for name in (*EXPORT_FILES.values(), "llm_config.json"):
            link_or_copy(export_dir / name, into / name)
        (into / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        yield MnnLlm(into / "config.json")
    finally:
        shutil.rmtree(into)


def host_config(config: dict[str, Any], threads: int) -> dict[str, Any]:
    """`config` as this machine runs it: CPU backend, no mmap (no device tmp_path here)."""
    kept = {k: v for k, v in config.items() if k != "tmp_path"}
    return {**kept, "backend_type": "cpu", "thread_num": threads, "use_mmap": False, "kvcache_mmap": False}


@dataclass
class Greedy:
    tokens: list[int]
    prompt_logits: Any  # numpy array: the last prompt position's logits
    prefill_s: float
    decode_s: float


class MnnLlm:
    """An export loaded by MNN's LLM engine from a directory holding config.json and its files."""

    def __init__(self, config: Path) -> None:
        import MNN.llm as llm

        for key, name in EXPORT_FILES.items():
            if not (config.parent / name).is_file():
                raise KilnError(f"{config}: {key} {name} is missing beside it")
        self.llm = llm.create(str(config))
        self.llm.load()

    def encode(self, text: str) -> list[int]:
        return list(self.llm.tokenizer_encode(text))

    def logits(self, ids: list[int]) -> Any:
        import numpy as np

        return np.array(self.llm.forward(ids).read(), dtype=np.float32).reshape(-1)

    def greedy(self, ids: list[int], n: int) -> Greedy:
        """Prefill `ids`, then n-1 single-token steps on the KV cache (n tokens, argmax)."""
        self.llm.reset()
        t0 = time.perf_counter()
        last = self.logits(ids)
        t1 = time.perf_counter()
        tokens = [int(last.argmax())]
        for _ in range(n - 1):
            tokens.append(int(self.logits(tokens[-1:]).argmax()))
        t2 = time.perf_counter()
        self.llm.reset()
        return Greedy(tokens, last, t1 - t0, t2 - t1)

    def response(self, prompt: str, max_new_tokens: int) -> str:
        """The chat answer (MNN applies the export's chat template), sampled as config.json says:
        the sampler is built at load, so set_config cannot switch it (a greedy check needs
        `sampler_type: greedy` in the config it loads)."""
        self.llm.reset()
        self.llm.set_config({"max_new_tokens": max_new_tokens})
        text = self.llm.response(prompt)
        self.llm.reset()
        return text
