"""Weight calibration at the Llama-3.2-1B shape, per decoder layer, CPU vs CUDA.

What it measures: the Qualcomm path's weight calibration, `quantize_weights` of
pipeline/qnn/quant/model.py (what `pipeline/qnn/quant/flow.py: quantize_model` calls), for the
algorithms `gptq` and `seqmse` with the scheme of recipes/schemes/w4a16_kv8.yaml (W4 blocks of
64, embeddings/LM head W8 per-channel), on a synthetic Llama-3.2-1B-shaped model: the config
recipes/models/llama-3.2-1b-instruct.json, float32 weights from `pipeline/generic/synthetic.py`'s
`init_tensor` (what `model.synthetic` writes). Calibration prompts: 64 × 290 tokens as the stage
uses by default (weight_calibration_samples 64; calibration_tokens 128 → chat prompt + answer),
here BOS (id 1) + random ids below 49152 from a seeded generator: the work does not depend on
the token values, so the timings are real and any quality figure is meaningless.

Per device it times the whole call and each decoder layer (the layer loop's `progress` is
replaced by a timer), plus the prologue (capturing layer 0's inputs) and the LM head (after the
last layer; only when the model is whole). CUDA runs all 16 layers + the LM head by default; CPU
runs a model truncated to the first `--cpu-layers` layers (same widths and the same weights as
the whole model's first layers, no LM head), so the per-layer CPU/CUDA ratio compares the same
layers measured in one run. Prints a markdown table, peak CUDA memory per algorithm, and writes
everything as JSON (`--json`, updated after each measurement so a run cut short keeps what it had).

For a lent GPU machine (the 1B shape needs ~5 GB of RAM per model copy, minutes of CUDA and far
more of CPU); never part of CI. On a CPU-only machine:
    .venv/bin/python bench/gpu_calibration.py --device cpu --layers 2
    .venv/bin/python bench/gpu_calibration.py --device cpu --layers 2 --toy   # seconds: hidden 64
On the GPU box (torch, transformers there; blake3 carried as a wheel):
    python3 bench/gpu_calibration.py --threads 16 --json $OUT/gpu_calibration.json
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "recipes" / "models" / "llama-3.2-1b-instruct.json"
SCHEME = ROOT / "recipes" / "schemes" / "w4a16_kv8.yaml"
TOY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
           vocab_size=512, bos_token_id=1, eos_token_id=2)  # --toy: a local smoke test of the script, not a measurement
BOS, TOKEN_IDS = 1, 49152


def scheme_dict(path: Path) -> tuple[dict[str, Any], str]:
    """The scheme as the quantize stage reads it (`pipeline/qnn/quantize.py: scheme_params`); without
    pydantic (the GPU box has none) the same dict built from the YAML with the schema's defaults."""
    import yaml

    doc = yaml.safe_load(path.read_text())
    try:
        from pipeline.qnn.quantize import scheme_params
        from pipeline.recipe.schema import SchemeSpec
    except ImportError:
        def weights(w: dict[str, Any]) -> dict[str, Any]:
            return {"bits": w["bits"], "granularity": w.get("granularity", "per-channel"),
                    "block_size": w.get("block_size"), "symmetric": w.get("symmetric", True)}

        return {"engine": doc.get("engine", "kiln"), "weights": weights(doc["weights"]),
                "activations": doc["activations"]["bits"],
                "float16_outlier_ratio": doc["activations"].get("float16_outlier_ratio"),
                "kv_cache": doc["kv_cache"]["bits"],
                "overrides": [{"match": o["match"], "weights": weights(o["weights"]) if o.get("weights") else None,
                               "activations": o.get("activations")} for o in doc.get("overrides", [])]}, "yaml"
    return scheme_params(SchemeSpec(name=path.stem, **doc)), "scheme_params"


def without_head(scheme: dict[str, Any]) -> dict[str, Any]:
    """The scheme with the LM head (and tied embeddings) kept float: a truncated model's head is
    not part of the layer comparison."""
    s = copy.deepcopy(scheme)
    s["overrides"].insert(0, {"match": "lm_head|embed_tokens", "weights": {"bits": 32, "granularity": "per-tensor",
                                                                          "block_size": None, "symmetric": True},
                              "activations": None})
    return s


def build_model(config: dict[str, Any], seed: int) -> Any:
    """The synthetic checkpoint's model in float32, in memory: `meta_model` for names, shapes and
    tying, `init_tensor` for every tensor (as `write_checkpoint` does), assigned without a random
    init first; buffers no checkpoint holds (RoPE's inv_freq) come from their module's constructor."""
    import torch

    from pipeline.generic.synthetic import init_tensor, meta_model

    model = meta_model(config)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    std = float(getattr(model.config, "initializer_range", 0.02))
    layers = model.config.num_hidden_layers
    state = {n: init_tensor(n, tuple(t.shape), torch.float32, seed, std, layers)
             for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}
    return assemble(model, state)


def assemble(model: Any, state: dict[str, Any]) -> Any:
    import torch

    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    if tied:
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, type(module)(config=model.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"still on the meta device: {left}"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model.eval()


def truncated(base: Any, config: dict[str, Any], layers: int) -> Any:
    """`base`'s first `layers` decoder layers (copies of the same weights) with its embeddings and norm."""
    from pipeline.generic.synthetic import meta_model

    model = meta_model({**config, "num_hidden_layers": layers})
    keep = model.state_dict().keys()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    src = base.state_dict()
    return assemble(model, {n: src[n].clone() for n in keep if not (tied and n == "lm_head.weight")})


def timed_run(model: Any, scheme: dict[str, Any], algorithm: str, batches: list[Any], device: str) -> dict[str, Any]:
    """One `quantize_weights` call, with a timestamp at each decoder layer's start and the loop's end."""
    import torch

    import pipeline.qnn.quant.model as qmodel

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    marks: list[float] = []
    real = qmodel.progress

    def ticking(items, desc, unit, total=None):
        for item in items:
            sync()
            marks.append(time.perf_counter())
            if len(marks) > 1:
                print(f"  {algorithm} {device} layer {len(marks) - 2}: {marks[-1] - marks[-2]:.2f} s", flush=True)
            yield item
        sync()
        marks.append(time.perf_counter())
        print(f"  {algorithm} {device} layer {len(marks) - 2}: {marks[-1] - marks[-2]:.2f} s", flush=True)

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    qmodel.progress = ticking
    try:
        sync()
        t0 = time.perf_counter()
        rows = qmodel.quantize_weights(model, scheme, algorithm, batches, device)
        sync()
        t1 = time.perf_counter()
    finally:
        qmodel.progress = real
    n = model.config.num_hidden_layers
    out: dict[str, Any] = {"algorithm": algorithm, "device": device, "layers": n, "weights": len(rows),
                           "head": any(r["name"].startswith("lm_head") for r in rows),
                           "total_s": round(t1 - t0, 3)}
    if len(marks) == n + 1:
        out |= {"per_layer_s": [round(b - a, 3) for a, b in zip(marks, marks[1:])],
                "prologue_s": round(marks[0] - t0, 3), "head_s": round(t1 - marks[-1], 3)}
    else:  # quantize_weights no longer loops through `progress` once per layer: totals only
        out["per_layer_s"] = None
    if device == "cuda":
        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def table(results: list[dict[str, Any]]) -> str:
    """Per layer: CPU and CUDA seconds and CPU/CUDA, per algorithm, for the layers both ran."""
    by = {(r["algorithm"], r["device"]): r for r in results}
    lines = []
    for algorithm in dict.fromkeys(r["algorithm"] for r in results):
        cpu, cuda = by.get((algorithm, "cpu")), by.get((algorithm, "cuda"))
        lines += [f"\n{algorithm}:", "| layer | CPU (s) | CUDA (s) | CPU / CUDA |", "|---|---:|---:|---:|"]
        cl = (cpu or {}).get("per_layer_s") or []
        gl = (cuda or {}).get("per_layer_s") or []
        for i in range(max(len(cl), len(gl))):
            c = cl[i] if i < len(cl) else None
            g = gl[i] if i < len(gl) else None
            ratio = f"{c / g:.1f}×" if c is not None and g else "—"
            lines.append(f"| {i} | {'—' if c is None else f'{c:.2f}'} | {'—' if g is None else f'{g:.2f}'} | {ratio} |")
        if cl and gl:
            k = min(len(cl), len(gl))
            c, g = sum(cl[:k]), sum(gl[:k])
            lines.append(f"| layers 0–{k - 1} | {c:.2f} | {g:.2f} | {c / g:.1f}× |")
        for name, r in (("CPU", cpu), ("CUDA", cuda)):
            if r:
                extra = "" if not r.get("per_layer_s") else f", prologue {r['prologue_s']:.2f} s" + (
                    f", LM head {r['head_s']:.2f} s" if r["head"] else ", no LM head")
                mem = f", peak CUDA memory {r['peak_cuda_gib']:.2f} GiB" if "peak_cuda_gib" in r else ""
                lines.append(f"{name}: {r['layers']} layers, {r['weights']} weights, total {r['total_s']:.2f} s"
                             f"{extra}{mem}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "both"],
                    help="auto: both when CUDA is present, else cpu")
    ap.add_argument("--layers", type=int, help="decoder layers on every device (sets --cpu-layers and --cuda-layers)")
    ap.add_argument("--cpu-layers", type=int, default=2, help="decoder layers on CPU (a truncated model, no LM head)")
    ap.add_argument("--cuda-layers", type=int, help="decoder layers on CUDA (default: all, with the LM head)")
    ap.add_argument("--algorithms", default="gptq,seqmse")
    ap.add_argument("--prompts", type=int, default=64, help="calibration prompts (weight_calibration_samples)")
    ap.add_argument("--tokens", type=int, default=290, help="tokens per prompt, BOS included")
    ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1), help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights (as model.synthetic.seed)")
    ap.add_argument("--toy", action="store_true", help="hidden 64, vocab 512: a smoke test of this script")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    import torch
    import transformers

    from pipeline.qnn.quant.model import quantize_weights

    torch.set_num_threads(args.threads)
    has_cuda = torch.cuda.is_available()
    devices = {"auto": ["cuda", "cpu"] if has_cuda else ["cpu"], "both": ["cuda", "cpu"]}.get(args.device, [args.device])
    if "cuda" in devices and not has_cuda:
        sys.exit("no CUDA device")
    config = json.loads(CONFIG.read_text()) | (TOY if args.toy else {})
    total_layers = config["num_hidden_layers"]
    want = {"cpu": args.layers or args.cpu_layers, "cuda": args.layers or args.cuda_layers or total_layers}
    for d in devices:
        if not 1 <= want[d] <= total_layers:
            sys.exit(f"--layers on {d}: 1..{total_layers}")
    scheme, scheme_from = scheme_dict(SCHEME)

    gen = torch.Generator().manual_seed(0)  # token ids: random below 49152 (SmolLM2's vocabulary), BOS 1 first
    ids = min(TOKEN_IDS, config["vocab_size"])
    batches = [torch.cat([torch.tensor([[BOS]]), torch.randint(0, ids, (1, args.tokens - 1), generator=gen)], 1)
               for _ in range(args.prompts)]
    if has_cuda and "cuda" in devices:  # CUDA context, cuBLAS/cuSOLVER handles, kernels: loaded outside the timing
        warm = build_model({**config, **TOY, "num_hidden_layers": 1}, args.seed)
        for algorithm in args.algorithms.split(","):
            quantize_weights(copy.deepcopy(warm), scheme, algorithm, [torch.randint(0, TOY["vocab_size"], (1, 32))], "cuda")
        torch.cuda.synchronize()

    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cuda_device": torch.cuda.get_device_name() if has_cuda else None,
            "config": CONFIG.name, "toy": args.toy, "scheme": scheme, "scheme_from": scheme_from,
            "prompts": args.prompts, "tokens": args.tokens, "seed": args.seed,
            "sha256_12": {p: sha(ROOT / p) for p in ("pipeline/qnn/quant/model.py", "pipeline/qnn/quant/algorithms.py",
                                                     "pipeline/qnn/quant/grid.py")}}
    print(f"torch {info['torch']}, transformers {info['transformers']}, {info['threads']} CPU threads, "
          f"{info['cuda_device'] or 'no CUDA device'}; scheme from {scheme_from}", flush=True)
    t0 = time.perf_counter()
    base = build_model(config, args.seed)
    info["build_s"] = round(time.perf_counter() - t0, 1)
    info["parameters"] = sum(p.numel() for p in base.parameters())
    print(f"model: {info['parameters'] / 1e9:.3f}B parameters, built in {info['build_s']} s; "
          f"{args.prompts} prompts × {args.tokens} tokens", flush=True)

    results: list[dict[str, Any]] = []

    def save() -> None:
        if args.json:
            info["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"info": info, "results": results}, indent=1) + "\n")

    save()
    for device in devices:
        n = want[device]
        whole = n == total_layers
        for algorithm in args.algorithms.split(","):
            model = copy.deepcopy(base) if whole else truncated(base, config, n)
            r = timed_run(model, scheme if whole else without_head(scheme), algorithm, batches, device)
            del model
            results.append(r)
            print(f"{algorithm} on {device}: {r['layers']} layers, total {r['total_s']:.2f} s"
                  + (f", peak {r['peak_cuda_gib']} GiB" if "peak_cuda_gib" in r else ""), flush=True)
            save()
    print(table(results))


if __name__ == "__main__":
    main()
