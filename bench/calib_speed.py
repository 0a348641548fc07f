"""Weight calibration speed, CPU vs CUDA (issue 4, point 3): SeqMSE and GPTQ on a model of
SmolLM2-135M's exact shape (random seeded weights: the work does not depend on their values),
W4 blocks of 64 as in recipes/schemes/w4a16_kv8.yaml, calibration prompts of random tokens of
the stage's default size. Prints seconds per device and the CPU/CUDA ratio of the same run.

Only pipeline.qnn.quant is imported, so it runs wherever torch and transformers do:
    .venv/bin/python bench/calib_speed.py            # here: CPU only, no ratio
    python3 bench/calib_speed.py                      # on a GPU machine: the ratio
Never part of CI (no GPU there).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e5})


def main() -> None:
    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.qnn.quant.model import quantize_weights

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64, help="calibration prompts (the stage's weight_calibration_samples)")
    ap.add_argument("--tokens", type=int, default=290, help="tokens per prompt (chat template + 2 × 128 text tokens)")
    ap.add_argument("--algorithms", default="seqmse,gptq")
    args = ap.parse_args()
    scheme = yaml.safe_load((ROOT / "recipes" / "schemes" / "w4a16_kv8.yaml").read_text())
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, SMOLLM2_135M["vocab_size"], (1, args.tokens), generator=gen) for _ in range(args.prompts)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices:  # CUDA context and cuBLAS handles are created once, outside the timed runs
        torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")
        torch.cuda.synchronize()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ", no CUDA device"), flush=True)
    print(f"{args.prompts} prompts × {args.tokens} tokens, W4 blocks of 64, SmolLM2-135M shape\n")
    print("| algorithm | " + " | ".join(f"{d} (s)" for d in devices) + (" | CPU / CUDA |" if len(devices) > 1 else " |"))
    print("|---|" + "---:|" * (len(devices) + (len(devices) > 1)))
    for algorithm in args.algorithms.split(","):
        seconds = []
        for device in devices:
            model = copy.deepcopy(base)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            quantize_weights(model, scheme, algorithm, batches, device)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
        ratio = f" {seconds[0] / seconds[1]:.1f}× |" if len(seconds) > 1 else ""
        print(f"| {algorithm} | " + " | ".join(f"{s:.1f}" for s in seconds) + " |" + ratio, flush=True)


if __name__ == "__main__":
    main()
