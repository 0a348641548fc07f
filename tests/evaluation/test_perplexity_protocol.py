"""The shared perplexity protocol: llama.cpp's log-probability file written and read back, the
scoring rule against a direct computation, the float reference streamed layer by layer against
the whole model, llama-perplexity's output parsed (a real run's), and bad files refused."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.engine.errors import KilnError
from pipeline.engine.stage import StageContext
from pipeline.evaluation.logprobs import (
    REFERENCE_FILE,
    SUMMARY_FILE,
    Scorer,
    decode,
    encode,
    log_softmax,
    read_reference,
    score_windows,
)
from pipeline.generic.layers import streamed_logits
from pipeline.generic.reference import Reference
from pipeline.llamacpp.perplexity import parse_kld

DATA = Path(__file__).parents[1] / "llamacpp" / "data"


def test_stored_log_probs_are_the_log_softmax_within_half_a_step_above_the_floor():
    logits = np.random.default_rng(0).normal(0, 4, size=(6, 1000)).astype(np.float32)
    records = encode(logits)
    assert records.shape == (6, 1004) and records.dtype == np.uint16
    exact, stored = log_softmax(logits), decode(records, 1000)
    scale = records[:, :2].copy().view("<f4")[:, 0]
    above = logits > logits.max(axis=1, keepdims=True) - 16
    assert np.all(np.abs(stored - exact)[above] <= (scale[:, None] / 2 + 1e-4).repeat(1000, 1)[above])
    odd = encode(logits[:, :999])  # an odd vocabulary is padded to an even record
    assert odd.shape == (6, 1004)


def test_scorer_gives_perplexity_kl_divergence_and_top1_as_computed_directly():
    rng = np.random.default_rng(1)
    ref = rng.normal(0, 3, size=(40, 300)).astype(np.float32)
    ours = ref + rng.normal(0, 0.5, size=ref.shape).astype(np.float32)
    targets = rng.integers(0, 300, size=40)
    scorer = Scorer(300)
    scorer.add(ours, encode(ref), targets)
    got = scorer.result()
    lp, lq = (torch.log_softmax(torch.tensor(x, dtype=torch.float64), -1) for x in (ref, ours))
    nll = -lq[torch.arange(40), torch.tensor(targets)]
    assert got["ppl"] == pytest.approx(float(nll.mean().exp()), rel=1e-5)
    kld = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert got["kld"] == pytest.approx(kld, rel=2e-3)
    assert got["same_top_pct"] == pytest.approx(100 * float((lp.argmax(-1) == lq.argmax(-1)).double().mean()))
    assert got["tokens_scored"] == 40 and got["ppl_err"] > 0


def test_streamed_float_logits_equal_the_whole_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 128, 32).tolist() for _ in range(2)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for ids, got in zip(windows, streamed_logits(tiny_model_dir, windows, slice(16, 31)), strict=True):
        with torch.no_grad():
            whole = model(torch.tensor([ids])).logits[0, 16:31]
        torch.testing.assert_close(got, whole, rtol=0, atol=1e-6)


def _reference(tmp_path: Path, model_dir: Path, words: int, window: int, windows: int) -> Path:
    text = tmp_path / "text"
    text.mkdir()
    (text / "evaluation.txt").write_text(" ".join(f"w{(i * 7) % 120}" for i in range(words)) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext("r", "", {"window": window, "windows": windows}, {"model": model_dir, "text": text}, {}, out,
                       tmp_path, tmp_path, "k", tmp_path, tmp_path, log=logging.getLogger("test"))
    Reference().run(ctx)
    return out


def with_bos(model_dir: Path, into: Path) -> Path:
    """A copy of the tiny model whose tokenizer puts <s> (id 0) in front of every text."""
    import shutil

    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    shutil.copytree(model_dir, into)
    tok = Tokenizer.from_file(str(into / "tokenizer.json"))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(into / "tokenizer.json"))
    return into


def test_reference_file_reads_back_and_a_backend_with_the_float_logits_matches_it(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model_dir = with_bos(tiny_model_dir, tmp_path / "bos_model")
    out = _reference(tmp_path, model_dir, 200, 32, 3)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    ref = read_reference(out / REFERENCE_FILE)
    assert (ref.n_ctx, ref.n_vocab, ref.windows) == (32, 128, 3) and summary["bos"] == 0
    assert ref.tokens[0, 0] != 0  # the file keeps the text's ids; the BOS goes in when a window runs
    assert summary["float"]["tokens_scored"] == 3 * 15 and summary["float"]["same_top_pct"] == 100
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    seen = []

    def float_backend(ids: list[int], first: int, n: int) -> np.ndarray:
        seen.append(ids)
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, first:first + n].numpy()

    stats, _ = score_windows(out, float_backend, "test")
    assert len(seen) == 3 and all(ids[0] == 0 for ids in seen)  # BOS first in every window, as llama-perplexity runs it
    assert stats["ppl"] == pytest.approx(summary["float"]["ppl"], rel=1e-6) and stats["kld"] < 1e-5


def test_text_too_short_for_the_windows_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(KilnError, match=r"eval.perplexity: the evaluation text is 50 tokens; 4 windows of 32 need 128"):
        _reference(tmp_path, tiny_model_dir, 50, 32, 4)


def test_bad_reference_files_are_refused(tmp_path, tiny_model_dir):
    good = (_reference(tmp_path, tiny_model_dir, 100, 32, 2) / REFERENCE_FILE).read_bytes()
    bad = tmp_path / "bad.kld"
    cases = {b"_notlog_" + good[8:]: "no '_logits_' header",
             good[:-2]: "bytes, the header says",
             good[:8] + np.array([1 << 20], "<i4").tobytes() + good[12:]: "implausible header",
             good[:20] + np.array([5000], "<i4").tobytes() + good[24:]: "outside the vocabulary"}
    for data, problem in cases.items():
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=problem):
            read_reference(bad)


def test_llama_perplexity_kl_output_is_parsed():
    out = (DATA / "kld_f16_2windows.txt").read_text()  # a real run: the F16 SmolLM2 GGUF vs its float reference
    stats = parse_kld(out, 2)
    assert stats["ppl"] == 11.288235 and stats["ppl_base"] == 11.268512 and stats["kld"] == 4e-06
    assert stats["same_top_pct"] == 100.0 and stats["rms_dp_pct"] == 0.052
    lines_only = parse_kld(out.split("====== Perplexity statistics")[0], 2)  # under 100 tokens: no closing block
    assert lines_only["ppl"] == 11.2882 and lines_only["kld"] == 0.0 and "ppl_base" not in lines_only
    with pytest.raises(KilnError, match="scored 2 of 3 windows"):
        parse_kld(out, 3)
