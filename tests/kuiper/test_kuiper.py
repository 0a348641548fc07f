"""The Kuiper int8 format: the header and group quantization on known values, the Q/K permutation,
and a tiny Llama written, read back and run — the reader's logits equal HF's with the same int8
weights; a file without the permutation, or cut short, is caught."""
from __future__ import annotations

import io
import re
import struct

import numpy as np
import pytest
import torch

from pipeline.engine.errors import KilnError
from pipeline.kuiper.format import (
    HEADER,
    Header,
    dequantize_q8,
    forward,
    header_for,
    quantize_q8,
    read_model,
    to_interleaved,
    write_model,
)


def test_header_is_eight_little_endian_int32_with_the_vocab_sign_as_the_classifier_flag():
    h = Header(576, 1536, 30, 9, 3, -49152, 2048, 64)
    assert h.pack() == struct.pack("<iiiiiiii", 576, 1536, 30, 9, 3, -49152, 2048, 64)
    assert HEADER.size == 32 and not h.shared_classifier and h.vocab == 49152 and h.head_dim == 64


def test_group_quantization_matches_the_seeds_worked_examples():
    # the exporter's own example: [3,5,2,4] in groups of 2 → scales 5/127, 4/127 → q 76, 127, 64, 127
    q, s = quantize_q8(np.array([[3, 5, 2, 4]], np.float32), 2)
    np.testing.assert_allclose(s, [5 / 127, 4 / 127], rtol=1e-7)
    assert q.tolist() == [[76, 127, 64, 127]]
    q, s = quantize_q8(np.array([[1, 3, 5, -1]], np.float32), 2)
    assert q.tolist() == [[42, 127, 127, -25]]
    q, s = quantize_q8(np.zeros((1, 4), np.float32), 2)  # an all-zero group: zeros, not NaN
    assert q.tolist() == [[0, 0, 0, 0]] and s.tolist() == [0, 0]
    w = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    q, s = quantize_q8(w, 32)
    assert q.dtype == np.int8 and s.shape == (16,) and np.abs(q).max() == 127
    assert np.abs(dequantize_q8(q, s, 32) - w).max() <= s.max() / 2 + 1e-7


def test_qk_permutation_is_the_seeds_permute_reverse():
    n_heads, dim = 4, 16
    w = torch.arange(dim * 8, dtype=torch.float32).reshape(dim, 8)
    seed = w.view(n_heads, 2, dim // n_heads // 2, 8).transpose(1, 2).reshape(dim, 8)
    np.testing.assert_array_equal(to_interleaved(w.numpy(), n_heads), seed.numpy())


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention than random init gives, so RoPE's layout shows in the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def export(model, group=32, permute=True) -> tuple[bytes, Header]:
    import pipeline.kuiper.format as k

    state = {n: t.detach().float().numpy() for n, t in model.state_dict().items()}
    cfg = model.config.to_dict()
    header = header_for(cfg, group, 128, shared=model.config.tie_word_embeddings)
    f = io.BytesIO()
    saved = k.to_interleaved
    if not permute:
        k.to_interleaved = lambda w, n: w
    try:
        write_model(f, header, state.__getitem__)
    finally:
        k.to_interleaved = saved
    return f.getvalue(), header


def same_int8(model, group):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight") or (name == "lm_head.weight" and not model.config.tie_word_embeddings):
                p.copy_(torch.from_numpy(dequantize_q8(*quantize_q8(p.numpy(), group), group)))
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_round_trip_matches_hf_with_the_same_int8_weights(tmp_path, tied):
    model = tiny_llama(tied)
    data, header = export(model)
    h = header
    per_layer = 2 * h.dim * h.dim + 2 * h.dim * h.dim // 2 + 3 * h.dim * h.hidden_dim  # wq wo, wk wv (2 KV heads), w1-3
    q8 = h.n_layers * per_layer + (0 if tied else h.vocab * h.dim)
    assert len(data) == 32 + q8 + q8 // 32 * 4 + 4 * (h.vocab * h.dim + (2 * h.n_layers + 1) * h.dim)
    assert struct.unpack("<8i", data[:32]) == (64, 128, 2, 4, 2, 96 if tied else -96, 128, 32)
    path = tmp_path / "m.bin"
    path.write_bytes(data)
    read = read_model(path)
    tokens = [1, 5, 9, 17, 33, 65, 2, 7]
    ours = forward(read, tokens, 10000.0, model.config.rms_norm_eps)
    with torch.no_grad():
        ref = same_int8(model, 32)(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(ours - ref).max() < 1e-5


def test_a_file_without_the_qk_permutation_or_cut_short_is_caught(tmp_path):
    model = tiny_llama(True)
    data, _ = export(model, permute=False)
    (tmp_path / "m.bin").write_bytes(data)
    tokens = [1, 5, 9, 17, 33, 65, 2, 7]
    with torch.no_grad():
        ref = same_int8(model, 32)(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(forward(read_model(tmp_path / "m.bin"), tokens, 10000.0, model.config.rms_norm_eps) - ref).max() > 0.05
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(KilnError, match="the header implies more"):
        read_model(tmp_path / "short.bin")
    (tmp_path / "long.bin").write_bytes(data + b"\0" * 4)
    with pytest.raises(KilnError, match="4 bytes left"):
        read_model(tmp_path / "long.bin")


@pytest.mark.parametrize("change, problem", [
    ({"intermediate_size": 100}, "intermediate_size 100 is not a multiple of the group size 64"),
    ({"model_type": "qwen2", "attention_bias": True}, "model_type 'qwen2'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling 'llama3'"),
    ({"head_dim": 128}, "head_dim 128"),
])
def test_header_for_refuses_what_the_format_cannot_hold(change, problem):
    cfg = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "num_hidden_layers": 30, "vocab_size": 49152, **change}
    with pytest.raises(KilnError, match=f"cannot hold this model: .*{problem}"):
        header_for(cfg, 64, 2048, shared=True)


@pytest.mark.slow
def test_stage_exports_and_verifies_the_tiny_llama_and_refuses_a_4bit_scheme(tiny_project):
    import json

    tiny_project.write("tk.yaml", "extends: tiny\ntarget: kuiper\ncontext_length: 128\n"
                                  "scheme: {use: kuiper_int8_g64}\nstages:\n  kuiper.verify: {prompt: w5 w9 w17 w33 w65}\n")
    tiny_project.doit("recipe=tk")
    out = tiny_project.artifacts / "tk"
    meta = json.loads((out / "kuiper.export" / "kuiper.json").read_text())
    assert meta["header"] == {"dim": 64, "hidden_dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128,
                              "max_seq_len": 128, "group_size": 64, "shared_classifier": True}
    report = json.loads((out / "kuiper.verify" / "verify.json").read_text())
    assert report["layout"]["max_abs_diff_vs_hf_same_int8"] < 1e-5 and report["layout"]["top1_agreement"] == 1.0
    # the shared perplexity protocol on the file as read: int8 groups of 64 stay near the float model
    ppl = json.loads((out / "kuiper.perplexity" / "perplexity.json").read_text())
    reference = json.loads((out / "reference" / "reference.json").read_text())
    assert ppl["tokens_scored"] == reference["float"]["tokens_scored"] == 30
    assert ppl["kld"] < 1e-3 and abs(ppl["ppl"] / reference["float"]["ppl"] - 1) < 0.01
    assert ppl["size_bytes"] == (out / "kuiper.export" / "model_int8.bin").stat().st_size
    shipped = sorted(p.name for p in (out / "bundle" / "to_device").iterdir())
    assert {"model_int8.bin", "kuiper.json", "tokenizer.json", "report", "README.md"} <= set(shipped)
    readme = (out / "bundle" / "to_device" / "README.md").read_text()
    assert "dim 64, hidden_dim 128, n_layers 2" in readme and "vocab_size 128" in readme
    assert "RoPE theta 10000, what KuiperLLama's kernels use" in readme

    tiny_project.write("tk4.yaml", "extends: tiny\ntarget: kuiper\nscheme: mnn_int4_b64\n")
    failed = tiny_project.doit("recipe=tk4", "list", check=False)
    assert failed.returncode != 0
    assert re.search(r"tk4.yaml:3: scheme 'mnn_int4_b64': the Kuiper format stores symmetric int8 .*got bits 4",
                     failed.stdout + failed.stderr)


def test_recipes_share_entries_except_the_ones_that_name_the_recipe(tiny_project):
    body = "extends: tiny\ntarget: kuiper\nscheme: kuiper_int8_g64\n"
    tiny_project.write("ka.yaml", body)
    tiny_project.write("kb.yaml", body)
    keys = {}
    for name in ("ka", "kb"):
        listing = tiny_project.doit("list", f"recipe={name}").stdout
        keys[name] = dict(re.findall(rf"^{name}:(\S+)\s+stage \S+ \(key (\w+)…\)", listing, re.M))
    assert {s for s in keys["ka"] if keys["ka"][s] != keys["kb"][s]} == {"kuiper.package", "report", "bundle"}
