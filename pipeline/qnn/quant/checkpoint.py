"""Per-layer checkpoints of a sequential calibration (SeqMSE / GPTQ), so a killed or failed run
resumes at the layer it reached with identical final bytes.

After decoder layer i is calibrated: `layer-<i>.safetensors` holds its quantized weights with
their scales and zero points (report rows in the metadata), then `states.safetensors` is
replaced by the hidden states layer i+1 will see (metadata: the layer they follow). Files are
written beside and renamed into place, so a kill leaves the previous layer's complete state.
The directory is the stage's resume dir (one per action key: the prompts, device and scheme are
all in the key) and goes away when the stage publishes. safetensors only: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from pipeline.qnn.quant.grid import Grid

ROW_FIELDS = ("name", "bits", "granularity", "block_size", "symmetric", "sqnr_db")


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:  # on disk before the rename: a power cut leaves the previous layer's state
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LayerCheckpoints:
    def __init__(self, directory: Path, fingerprint: dict[str, Any]) -> None:
        self.dir = directory
        self.fingerprint = json.dumps(fingerprint, sort_keys=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, layer: int, rows: list[dict[str, Any]], modules: dict[str, torch.nn.Module],
             states: list[torch.Tensor]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for r in rows:
            module = modules[r["name"].removesuffix(".weight")]
            tensors |= {f"weight:{r['name']}": module.weight.data, f"scale:{r['name']}": r["scale"],
                        f"zero:{r['name']}": r["zero"]}
        meta = {"rows": json.dumps([{k: r[k] for k in ROW_FIELDS} for r in rows])}
        _save(tensors, self.dir / f"layer-{layer:04d}.safetensors", meta)
        _save({str(j): s for j, s in enumerate(states)}, self.dir / "states.safetensors",
              {"after_layer": str(layer), "fingerprint": self.fingerprint})

    def last_layer(self) -> int:
        """The last layer whose complete state is here, -1 when none, from another calibration, or
        unreadable (a truncated file: the calibration then starts over instead of failing forever)."""
        path = self.dir / "states.safetensors"
        if not path.is_file():
            return -1
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            last = int(meta["after_layer"]) if meta.get("fingerprint") == self.fingerprint else -1
            for i in range(last + 1):
                with safe_open(str(self.dir / f"layer-{i:04d}.safetensors"), "pt") as f:
                    json.loads((f.metadata() or {})["rows"])
        except (OSError, ValueError, KeyError, SafetensorError):
            return -1
        return last

    def restore(self, last: int, modules: dict[str, torch.nn.Module], device: str
                ) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
        """Put layers 0..last's quantized weights back into `modules`; return their report rows and
        the hidden states after layer `last`."""
        rows = []
        for i in range(last + 1):
            path = self.dir / f"layer-{i:04d}.safetensors"
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["rows"])
            tensors = load_file(str(path))
            for r in meta:
                module = modules[r["name"].removesuffix(".weight")]
                module.weight.data = tensors[f"weight:{r['name']}"].to(module.weight.device, module.weight.dtype)
                grid = Grid(r["bits"], r["granularity"], r["block_size"], r["symmetric"])
                rows.append(r | {"grid": grid, "scale": tensors[f"scale:{r['name']}"],
                                 "zero": tensors[f"zero:{r['name']}"]})
        states = load_file(str(self.dir / "states.safetensors"), device=device)
        return rows, [states[str(j)] for j in range(len(states))]
