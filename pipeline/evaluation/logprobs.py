"""The float reference's log-probabilities in llama.cpp's KL-divergence file, and the scoring rule.

One protocol for every backend: the evaluation text is tokenized once; windows of `n_ctx` tokens
(the first replaced by BOS when the tokenizer adds one) are run through each backend; the second
half of each window is scored (positions n_ctx/2 .. n_ctx-2 predict the token after them), as
llama.cpp's `llama-perplexity` does. The reference file is the one `llama-perplexity
--kl-divergence-base` writes (layout read from tools/perplexity/perplexity.cpp at the pinned
llama.cpp): "_logits_", int32 n_ctx, int32 n_vocab, int32 n_chunk, int32 tokens[n_chunk*n_ctx],
then per scored position a record of (float32 scale, float32 min_log_prob) and one uint16 per
vocabulary entry (padded to even), log p = scale*q + min_log_prob, entries more than 16 nats
below the top stored as 0. Kiln writes it from the float HF model, so `llama-perplexity
--kl-divergence` scores every GGUF on exactly these token ids; `Scorer` applies the same
arithmetic to the logits of the other backends.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_FILE, SUMMARY_FILE = "reference.kld", "reference.json"  # the reference stage's output
MAGIC = b"_logits_"
HEADER_BYTES = len(MAGIC) + 12  # then int32 n_ctx, n_vocab, n_chunk
MAX_VOCAB = 1 << 20
MAX_TOKENS = 1 << 24


def record_width(n_vocab: int) -> int:
    """uint16 entries per scored position: 4 for the two float32s, the vocabulary padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored(n_ctx: int) -> tuple[int, int]:
    """(first scored position, positions scored per window)."""
    first = n_ctx // 2
    return first, n_ctx - 1 - first


def encode(logits: np.ndarray) -> np.ndarray:
    """[n, vocab] float logits → [n, record_width] uint16 records (llama.cpp's log_softmax)."""
    logits = np.asarray(logits, dtype=np.float32)
    n, vocab = logits.shape
    top = logits.max(axis=1)
    low = np.maximum(logits.min(axis=1), top - 16)
    lse = np.log(np.exp((logits - top[:, None]).astype(np.float64)).sum(axis=1)).astype(np.float32)
    scale = ((top - low) / np.float32(65535)).astype(np.float32)
    min_log_prob = (low - top - lse).astype(np.float32)
    out = np.zeros((n, record_width(vocab)), dtype=np.uint16)
    out[:, :4] = np.stack([scale, min_log_prob], axis=1).astype("<f4").view(np.uint16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((logits - low[:, None]) * (np.float32(1) / scale)[:, None])
    q = np.where((logits > low[:, None]) & (scale[:, None] > 0), q, 0)
    out[:, 4:4 + vocab] = np.clip(q, 0, 65535).astype(np.uint16)
    return out


def decode(records: np.ndarray, n_vocab: int) -> np.ndarray:
    """[n, record_width] uint16 → [n, vocab] float32 log-probabilities."""
    floats = np.ascontiguousarray(records[:, :4]).view("<f4")
    return (floats[:, :1] * records[:, 4:4 + n_vocab].astype(np.float32) + floats[:, 1:2]).astype(np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    top = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp((logits - top).astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)
    return logits - top - lse


@dataclass
class Reference:
    """A reference file's header and tokens; `records(i)` reads window i's scored positions."""

    path: Path
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # [n_chunk, n_ctx] int32

    @property
    def windows(self) -> int:
        return len(self.tokens)

    def records(self, window: int) -> np.ndarray:
        _, per = scored(self.n_ctx)
        width = record_width(self.n_vocab)
        offset = HEADER_BYTES + self.tokens.size * 4 + window * per * width * 2
        return np.fromfile(self.path, dtype="<u2", count=per * width, offset=offset).reshape(per, width)

    def targets(self, window: int) -> np.ndarray:
        first, per = scored(self.n_ctx)
        return self.tokens[window, first + 1:first + 1 + per]


def read_reference(path: Path) -> Reference:
    """The header and tokens of a reference file, bounded and checked against its size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{path.name}: not a llama.cpp log-probability file (no '_logits_' header)")
    n_ctx, n_vocab, n_chunk = struct.unpack("<iii", head[len(MAGIC):])
    if not (4 <= n_ctx <= 1 << 17 and 2 <= n_vocab <= MAX_VOCAB and 1 <= n_chunk and n_ctx * n_chunk <= MAX_TOKENS):
        raise ValueError(f"{path.name}: implausible header n_ctx={n_ctx} n_vocab={n_vocab} n_chunk={n_chunk}")
    _, per = scored(n_ctx)
    expect = len(head) + n_ctx * n_chunk * 4 + n_chunk * per * record_width(n_vocab) * 2
    if size != expect:
        raise ValueError(f"{path.name}: {size} bytes, the header says {expect}")
    tokens = np.fromfile(path, dtype="<i4", count=n_ctx * n_chunk, offset=len(head)).reshape(n_chunk, n_ctx)
    if tokens.min() < 0 or tokens.max() >= n_vocab:
        raise ValueError(f"{path.name}: token ids outside the vocabulary of {n_vocab}")
    return Reference(path, n_ctx, n_vocab, tokens)


def _mean_err(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama-perplexity's mean and its standard error (0 below 11 samples)."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total2 / count - mean * mean
    return mean, math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0


@dataclass
class Scorer:
    """Accumulates what llama-perplexity --kl-divergence reports, from a backend's logits at the
    scored positions of each window against the reference's log-probs."""

    n_vocab: int
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("nll", "nll2", "base", "base2", "kld", "kld2", "pdiff2", "pdiff4"), 0.0))
    same_top: int = 0
    count: int = 0

    def add(self, logits: np.ndarray, records: np.ndarray, targets: np.ndarray) -> None:
        logp = log_softmax(np.asarray(logits, dtype=np.float32)[:, :self.n_vocab])
        if logp.shape != (len(targets), self.n_vocab):
            raise ValueError(f"logits of shape {logp.shape} for {len(targets)} scored positions of a "
                             f"{self.n_vocab}-token vocabulary")
        base = decode(records, self.n_vocab)
        rows = np.arange(len(targets))
        nll = -logp[rows, targets].astype(np.float64)
        nll_base = -base[rows, targets].astype(np.float64)
        kept = base > -16
        kld = np.where(kept, np.exp(base) * (base - logp), 0).sum(axis=1, dtype=np.float64)
        pdiff2 = (np.exp(-nll) - np.exp(-nll_base)) ** 2
        s = self.sums
        s["nll"] += nll.sum()
        s["nll2"] += (nll * nll).sum()
        s["base"] += nll_base.sum()
        s["base2"] += (nll_base * nll_base).sum()
        s["kld"] += kld.sum()
        s["kld2"] += (kld * kld).sum()
        s["pdiff2"] += pdiff2.sum()
        s["pdiff4"] += (pdiff2 * pdiff2).sum()
        self.same_top += int((logp.argmax(axis=1) == base.argmax(axis=1)).sum())
        self.count += len(targets)

    def result(self) -> dict[str, Any]:
        s, n = self.sums, self.count
        log_ppl, log_ppl_err = _mean_err(s["nll"], s["nll2"], n)
        log_base, log_base_err = _mean_err(s["base"], s["base2"], n)
        kld, kld_err = _mean_err(s["kld"], s["kld2"], n)
        mse, _ = _mean_err(s["pdiff2"], s["pdiff4"], n)
        top = self.same_top / n if n else 0.0
        return {"ppl": math.exp(log_ppl), "ppl_err": math.exp(log_ppl) * log_ppl_err,
                "ppl_base": math.exp(log_base), "ppl_base_err": math.exp(log_base) * log_base_err,
                "kld": kld, "kld_err": kld_err, "rms_dp_pct": 100 * math.sqrt(mse),
                "same_top_pct": 100 * top, "same_top_err_pct": 100 * math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
                "tokens_scored": n}


def bos_added(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer puts in front of a text, or None when it adds none."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos else None


def window_ids(summary: dict[str, Any], tokens: Any) -> list[int]:
    """A window's ids as every backend runs it: the first replaced by BOS when the tokenizer adds one."""
    ids = [int(t) for t in tokens]
    if summary["bos"] is not None:
        ids[0] = summary["bos"]
    return ids


def load_summary(reference_dir: Path) -> dict[str, Any]:
    return json.loads((reference_dir / SUMMARY_FILE).read_text())


# A backend's logits at the scored positions of one window: (window ids, first scored position,
# how many) → [how many, vocab].
WindowLogits = Callable[[list[int], int, int], np.ndarray]


def score_windows(reference_dir: Path, logits_of: WindowLogits, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every window of the reference through a backend and score it: (statistics, reference summary)."""
    from pipeline.engine.progress import progress

    summary = load_summary(reference_dir)
    reference = read_reference(reference_dir / REFERENCE_FILE)
    first, per = scored(reference.n_ctx)
    scorer = Scorer(reference.n_vocab)
    for w in progress(range(reference.windows), label, "window"):
        logits = logits_of(window_ids(summary, reference.tokens[w]), first, per)
        scorer.add(logits, reference.records(w), reference.targets(w))
    return scorer.result(), summary
