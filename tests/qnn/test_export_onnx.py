"""qnn.export: the adapted Llama equals HF; graphs export and match in onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.qnn.adapted_llama import AdaptedLlama, advance_past, io_names, step_inputs


def tiny_hf(rope_parameters=None, kv_heads=2, bias=False, num_hidden_layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    extra = {"rope_parameters": rope_parameters} if rope_parameters else {}
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=True, attention_bias=bias, **extra)
    model = LlamaForCausalLM(cfg).eval()
    if bias:  # random biases, so a dropped bias would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("rope,kv_heads,bias", [(None, 2, False), (LLAMA3_ROPE, 2, False), (None, 4, False),
                                                 (None, 1, True)])
def test_adapted_model_equals_hf_across_ar_steps(rope, kv_heads, bias):
    hf = tiny_hf(rope, kv_heads, bias)
    ids = torch.randint(0, 128, (1, 11))
    context = 16
    with torch.no_grad():
        reference = hf(ids).logits[0]
        model = AdaptedLlama(hf).eval()
        got, past = [], None
        for start in (0, 4):  # AR-4 prefill, two steps
            inputs = step_inputs(hf, ids[0, start:start + 4].tolist(), start, 4, context, past)
            out = model(*inputs)
            got.append(out[0][0])
            past = advance_past(list(inputs[4:]), list(out[1:]), 4)
        # switch to the AR-1 graph: its past window is 3 slots longer (right-aligned, zero-padded left)
        past = [torch.nn.functional.pad(t, (3, 0) if i % 2 == 0 else (0, 0, 3, 0)) for i, t in enumerate(past)]
        for start in (8, 9, 10):
            inputs = step_inputs(hf, [ids[0, start].item()], start, 1, context, past)
            out = model(*inputs)
            got.append(out[0][0])
            past = advance_past(list(inputs[4:]), list(out[1:]), 1)
    assert torch.allclose(torch.cat(got), reference, atol=1e-5)


def test_partial_last_step_is_padded_and_masked():
    hf = tiny_hf()
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        reference = hf(ids).logits[0]
        out = AdaptedLlama(hf)(*step_inputs(hf, ids[0].tolist(), 0, 8, 16))
    assert torch.allclose(out[0][0, :6], reference, atol=1e-5)


def test_io_names_and_kv_layout_follow_genie():
    hf = tiny_hf()
    names_in, names_out = io_names(2)
    assert names_in[:4] == ["input_ids", "attention_mask", "position_ids_cos", "position_ids_sin"]
    assert names_in[4:6] == ["past_key_0_in", "past_value_0_in"] and names_out[-1] == "past_value_1_out"
    inputs = step_inputs(hf, [1, 2, 3], 0, 4, 16)
    assert inputs[0].dtype == torch.int32 and tuple(inputs[1].shape) == (1, 1, 4, 16)
    assert tuple(inputs[2].shape) == (1, 1, 4, 8)  # pos-id-dim = head_dim / 2
    out = AdaptedLlama(hf)(*inputs)
    assert tuple(out[1].shape) == (2, 1, 16, 4) and tuple(out[2].shape) == (2, 1, 4, 16)  # new K, new V only


@pytest.mark.slow
def test_export_stage_on_tiny_model(tiny_project):
    tiny_project.write("tiny_npu.yaml", """\
        extends: tiny
        target: sm8750
        context_length: 64
        ar_lengths: [16, 1]
        stages:
          qnn.export: {check_tokens: 40}
        """)
    tiny_project.doit("recipe=tiny_npu", "tiny_npu:qnn.export@ar16", "tiny_npu:qnn.export@ar1")
    for ar in (16, 1):
        ws = tiny_project.artifacts / "tiny_npu" / f"qnn.export@ar{ar}"
        report = json.loads((ws / "export.json").read_text())
        assert report["graph"] == f"tiny-llama_ar{ar}_cl64" and report["tokens"] == 40
        assert report["max_abs_logit_diff"] < 1e-4 and report["top1_agreement"] == 1.0
        assert (ws / f"tiny-llama_ar{ar}_cl64.onnx").is_file() and (ws / f"tiny-llama_ar{ar}_cl64.data").is_file()
        vectors = np.load(ws / "test_vectors.npz")
        assert vectors["in.input_ids"].shape == (1, ar) and vectors["in.past_key_0_in"].shape == (2, 1, 16, 64 - ar)
        assert vectors["out.logits"].shape == (1, ar, 128)
        import onnx

        graph = onnx.load(str(ws / f"tiny-llama_ar{ar}_cl64.onnx"), load_external_data=False).graph
        assert graph.name == f"tiny-llama_ar{ar}_cl64"
        # q, k, v, o, gate, up, down per layer + lm_head, all as 1x1 convolutions; no Gemm left
        assert sum(n.op_type == "Conv" for n in graph.node) == 2 * 7 + 1
        assert not any(n.op_type == "Gemm" for n in graph.node)


@pytest.mark.parametrize("layout", ["one file per tensor", "inline"])
def test_gathered_external_data_is_what_onnx_save_model_writes(tmp_path, layout):
    """gather_external_data copies weights file to file (the proto never holds them) and must write
    the very bytes onnx.save_model would, from torch's one-file-per-weight layout or inline weights."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    from pipeline.qnn.onnx_files import gather_external_data

    hf = tiny_hf()
    model = AdaptedLlama(hf).eval()
    names_in, names_out = io_names(2)
    src = tmp_path / "src" / "export.onnx"
    src.parent.mkdir()
    with torch.no_grad():
        torch.onnx.export(model, step_inputs(hf, [1, 2, 3], 0, 8, 16), str(src), input_names=names_in,
                          output_names=names_out, opset_version=17, dynamo=False)
    loaded = onnx.load(str(src))
    if layout == "one file per tensor":
        convert_model_to_external_data(loaded, all_tensors_to_one_file=False, size_threshold=0)
        onnx.save_model(loaded, str(src))
        assert len(list(src.parent.iterdir())) > 10
    reference = onnx.load(str(src))
    reference.graph.name = "g"
    (tmp_path / "ref").mkdir()
    onnx.save_model(reference, str(tmp_path / "ref" / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="g.data", size_threshold=1024)
    (tmp_path / "got").mkdir()
    gather_external_data(src, tmp_path / "got" / "g.onnx", "g")
    for name in ("g.onnx", "g.data"):
        assert (tmp_path / "got" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
