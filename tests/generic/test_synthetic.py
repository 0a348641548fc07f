"""model.synthetic: a seeded random checkpoint of a published architecture (shape rehearsal)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.generic import synthetic

# Llama-3.2-1B's layout at toy width: GQA, llama3 rope scaling, tied embeddings, the real vocabulary
# size floor (the embedded tokenizer has 49152 ids).
TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 49408, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128009],
        "torch_dtype": "bfloat16"}


def synthetic_recipe(project, config: dict, seed: int = 0) -> None:
    path = project.recipes / "models" / "toy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    project.write("syn.yaml", f"""\
        model:
          name: toy-synthetic
          synthetic: {{config: {path}, seed: {seed}}}
          dtype: bfloat16
        target: x86_64
        scheme: fp32
        stages:
          bundle: {{compress_level: 1}}
        """)


def shard_digests(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.glob("*.safetensors"))}


@pytest.mark.slow  # 50 s: three builds of the model stage (two stores, two seeds)
def test_synthetic_checkpoint_loads_generates_and_is_deterministic(project, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    synthetic_recipe(project, TINY, seed=7)
    out = project.doit("recipe=syn").stdout
    assert "kiln: syn:model: built" in out
    model_dir = project.artifacts / "syn" / "model"
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["vocab_size"] == 49408 and summary["architecture"] == "LlamaForCausalLM"
    assert (summary["num_layers"], summary["num_kv_heads"], summary["head_dim"], summary["dtype"]) == (2, 2, 16, "bfloat16")
    q_k_v_o = 64 * 64 + 2 * 64 * 32 + 64 * 64
    assert summary["parameters"] == 49408 * 64 + 2 * (q_k_v_o + 3 * 64 * 128 + 2 * 64) + 64
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert model.config.bos_token_id == tok.bos_token_id != 128000   # the tokenizer's specials, not Llama's
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert 0.018 < float(w.std()) < 0.022 and abs(float(w.mean())) < 1e-3
    assert float(model.model.layers[0].mlp.down_proj.weight.std()) < 0.012   # residual writes scaled down
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    logits = model(ids).logits.detach()
    assert torch.isfinite(logits).all() and 0.01 < float(logits.std()) < 10   # a realistic range, no blow-up
    first = shard_digests(model_dir)

    # the same seed in another store: the same bytes; another seed: other bytes
    again = type(project)(project.dir, shared_store=tmp_path / "other-store")
    again.doit("recipe=syn")
    assert shard_digests(model_dir) == first
    synthetic_recipe(project, TINY, seed=8)
    project.doit("recipe=syn")
    assert shard_digests(model_dir).keys() == first.keys() and shard_digests(model_dir) != first


def test_shards_stay_below_the_budget_and_reload(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(synthetic, "SHARD_BYTES", 200_000)
    model = synthetic.meta_model({**TINY, "tie_word_embeddings": False})
    out = tmp_path / "ckpt"
    out.mkdir()
    sizes = synthetic.write_checkpoint(model, out, 0, "float16", lambda items, *_: items)
    model.config.save_pretrained(out)
    embed = 49408 * 64 * 2
    # embeddings and LM head alone (each larger than the budget), the layers between them together
    assert len(sizes) == 3 and max(sizes.values()) < embed + 10_000 and sorted(sizes.values())[0] <= 200_000
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(sizes) and "lm_head.weight" in index["weight_map"]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert loaded.model.layers[1].self_attn.k_proj.weight.shape == (32, 64)


@pytest.mark.parametrize(("change", "message"), [
    ({"vocab_size": 1000}, "vocab_size 1000 is smaller than the embedded tokenizer's 49152 ids"),
    ({"model_type": "no-such-arch"}, "model_type 'no-such-arch' is not an architecture transformers knows"),
    ({"hidden_size": "64"}, "hidden_size must be an integer in 1..1048576 (got '64')"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers must be an integer in 1..1048576"),
])
def test_bad_synthetic_configs_are_refused_by_name(project, change, message):
    synthetic_recipe(project, {**TINY, **change})
    proc = project.doit("recipe=syn", check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert message in text and "toy.json" in text
    assert not list((project.store / "outputs").glob("*/*")) if (project.store / "outputs").exists() else True
