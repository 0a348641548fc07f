"""The torch quantization sim quantizes the same tensors as the QDQ graph, and its grids behave."""
from __future__ import annotations

import math

import torch
from test_export_onnx import tiny_hf

from pipeline.qnn.adapted_llama import AdaptedLlama, io_names, run_steps, step_inputs, torch_step
from pipeline.qnn.quant import qdq
from pipeline.qnn.quant.sim import QuantSim

IDS = [5, 9, 17, 3, 44, 2, 90, 7, 61, 12]


def calibrated(hf, act_bits: int, kv_bits: int, ratio: float) -> QuantSim:
    sim = QuantSim(AdaptedLlama(hf).eval(), act_bits, kv_bits, ratio)
    run_steps(sim.step(), hf, IDS, 4, 16)
    sim.freeze()
    return sim


def test_sim_taps_match_the_graphs_activation_tensors(tmp_path):
    hf = tiny_hf()
    model = AdaptedLlama(hf).eval()
    names_in, names_out = io_names(2)
    path = tmp_path / "g.onnx"
    with torch.no_grad():
        torch.onnx.export(model, step_inputs(hf, [1], 0, 4, 16), str(path), input_names=names_in,
                          output_names=names_out, opset_version=17, dynamo=False)
    graph = qdq.load_structure(path)
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    tensors = [t for t in qdq.activation_tensors(graph) if not t.startswith("past_")]
    sim = calibrated(hf, 16, 8, math.inf)
    # the graph splits SiLU into Sigmoid and Mul, and re-quantizes the logits output; else 1:1
    sigmoids = sum(producers.get(t) == "Sigmoid" for t in tensors)
    assert sigmoids == 2 and len(sim.acts) == len(tensors) - sigmoids - 1
    # inside RMSNorm only the output is quantized (x² of a BOS token would wreck a 16-bit grid)
    assert not [t for t in tensors if "/norm1/" in t and not t.endswith("Mul_1_output_0")]


def logits(step, hf) -> torch.Tensor:
    return run_steps(step, hf, IDS, 4, 16)


def test_sim_error_grows_as_bits_shrink_and_float16_is_nearly_exact():
    hf = tiny_hf()
    ref = logits(torch_step(AdaptedLlama(hf).eval()), hf)
    err = {name: (logits(calibrated(hf, bits, kv, ratio).step(), hf) - ref).abs().max().item()
           for name, bits, kv, ratio in [("a16", 16, 32, math.inf), ("a8", 8, 32, math.inf),
                                          ("kv8", 32, 8, math.inf), ("fp16", 16, 32, 1.0001)]}
    assert 0 < err["a16"] < err["a8"]
    assert 0 < err["kv8"]
    assert err["fp16"] < 1e-2 and err["fp16"] < err["a16"] * 10


def test_every_tensor_float16_when_ratio_is_tiny_and_kv_encodings_are_shared():
    hf = tiny_hf()
    sim = calibrated(hf, 16, 8, 1.0001)
    assert sim.float16_share() > 0.9
    kv = sim.kv_encodings()
    assert set(kv) == {f"past_{k}_{i}_{s}" for k in ("key", "value") for i in range(2) for s in ("in", "out")}
    for i in range(2):
        a, b = kv[f"past_key_{i}_in"], kv[f"past_key_{i}_out"]
        assert (a.bits, a.scale, a.offset) == (b.bits, b.scale, b.offset) == (8, a.scale, a.offset)
        assert not a.is_float  # 8-bit KV never goes float16


def test_calibrate_ranges_reduces_in_the_graph_to_the_statistics_of_the_full_tensors(tmp_path):
    """The in-graph min / max / sum |x| / count equal an Observer fed every full tensor."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from pipeline.qnn.quant.observer import Observer

    hf = tiny_hf()
    names_in, names_out = io_names(2)
    path = tmp_path / "g" / "g.onnx"
    path.parent.mkdir()
    with torch.no_grad():
        torch.onnx.export(AdaptedLlama(hf).eval(), step_inputs(hf, [1], 0, 4, 16), str(path), input_names=names_in,
                          output_names=names_out, opset_version=17, dynamo=False)
    tensors = [t for t in qdq.activation_tensors(qdq.load_structure(path)) if not t.startswith("past_")]
    assert any(t in names_in for t in tensors) and any(t in names_out for t in tensors)

    def drive(step):
        run_steps(step, hf, IDS, 4, 16)

    got = qdq.calibrate_ranges(path, tensors, names_in, names_out, drive, tmp_path / "scratch")
    # reference: every tensor returned whole, as the graph computes it
    model = onnx.load(str(path))
    extra = [t for t in tensors if t not in names_in and t not in names_out]
    model.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in extra)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = {t: Observer() for t in tensors}

    def step(inputs):
        feed = {n: x.numpy() for n, x in zip(names_in, inputs)}
        values = dict(zip(names_out + extra, session.run(names_out + extra, feed)))
        for t in tensors:
            want[t].update(feed[t] if t in feed else values[t])
        return [torch.from_numpy(values[n]) for n in names_out]

    drive(step)
    assert not (tmp_path / "scratch").exists()
    for t in tensors:
        g, w = got[t], want[t]
        assert (g.lo, g.hi, g.count) == (w.lo, w.hi, w.count), t
        assert math.isclose(g.abs_sum, w.abs_sum, rel_tol=1e-6), t


def test_ar_perplexity_scored_step_by_step_equals_scoring_the_gathered_logits():
    """The streaming score (no window of logits kept) is exp(mean NLL) of the whole window's logits,
    with AR steps that do not divide the window (a last step of one token)."""
    from pipeline.qnn.adapted_llama import ar_perplexity

    hf = tiny_hf()
    step = torch_step(AdaptedLlama(hf).eval())
    ids = [(7 * i + 3) % 50 for i in range(2 * 13)]
    want = []
    for w in range(2):
        chunk = ids[w * 13:(w + 1) * 13]
        logits = run_steps(step, hf, chunk, 4, 13)
        want.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(chunk[1:]), reduction="none"))
    expected = math.exp(torch.cat(want).mean().item())
    assert math.isclose(ar_perplexity(step, hf, ids, 4, 13, windows=5), expected, rel_tol=1e-5)


def test_onnxruntime_runs_each_reduction_right_after_the_tensor_is_made(tmp_path):
    """What keeps calibration's memory flat: in onnxruntime's execution order (its profile), every
    activation's reductions run before any other compute node, so the activation can be freed
    at once instead of living until the end of the graph."""
    import json

    import onnx
    import onnxruntime as ort

    hf = tiny_hf()
    names_in, names_out = io_names(2)
    path = tmp_path / "g.onnx"
    with torch.no_grad():
        torch.onnx.export(AdaptedLlama(hf).eval(), step_inputs(hf, [1], 0, 4, 16), str(path), input_names=names_in,
                          output_names=names_out, opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    tensors = [t for t in qdq.activation_tensors(qdq.load_structure(path)) if t not in names_in]
    stats = qdq.with_reductions(model, tensors)
    assert len(stats) == 4 * len(tensors)
    options = qdq.calibration_options()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "profile")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {n: t.numpy() for n, t in zip(names_in, step_inputs(hf, [1, 2, 3], 0, 4, 16))})
    events = json.loads(open(session.end_profiling()).read())
    order = [e["name"].removesuffix("_kernel_time") for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    producer = {t: n.name for n in model.graph.node for t in n.output}
    ran = [n for n in order if "__" not in n]  # the graph's own nodes, in execution order
    checked = [t for t in tensors if producer[t] in order]  # not those whose producer onnxruntime fused
    gaps = {t: len([n for n in order[order.index(producer[t]) + 1:order.index(f"{t}__ReduceMin")] if "__" not in n])
            for t in checked}
    # a few nodes (a tensor's other consumers) at most, never the rest of the graph (up to 178 of
    # 181 nodes in onnxruntime's default order)
    assert max(gaps.values()) <= 4, gaps
    assert len(ran) > 100 and len(checked) > len(tensors) // 2
