"""AIMET-format encodings: what `qairt-converter --quantization_overrides` reads.

One `Encoding` per tensor (an activation by its ONNX tensor name, a parameter by its
initializer name), with AIMET's convention real = scale * (q + offset), q unsigned in
[0, 2^bw - 1]: a symmetric int8 weight has offset -128, an asymmetric uint16 activation
offset -zero_point.

Two file versions (both documented in README, "Encodings"):
- 1.0.0 (default): lists of {name, bw, dtype, enc_type, is_sym, scale[], offset[]}
  (+ block_size for PER_BLOCK), plus `producer` and `quantizer_args`.
- 0.6.1 (older QNN SDKs): dicts name -> [one {bitwidth, dtype, is_symmetric ("True"/"False"),
  min, max, scale, offset} per channel]; it has no per-block form.
A float16 tensor (mixed precision: HTP v73+ runs fp16) has no scale/offset: 1.0.0
{name, bw: 16, dtype: FLOAT, enc_type: PER_TENSOR, is_sym: true}, 0.6.1 [{bitwidth: 16, dtype: float}].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.engine.errors import KilnError

VERSIONS = ("1.0.0", "0.6.1")


@dataclass(frozen=True)
class Encoding:
    name: str
    bits: int
    symmetric: bool
    scale: tuple[float, ...]
    offset: tuple[int, ...]  # AIMET offsets (≤ 0): real = scale * (q + offset)
    block_size: int | None = None  # per-block weights: scale per (channel, block), row-major

    @property
    def is_float(self) -> bool:
        return not self.scale

    @property
    def enc_type(self) -> str:
        if self.block_size:
            return "PER_BLOCK"
        return "PER_CHANNEL" if len(self.scale) > 1 else "PER_TENSOR"


def encoding_from_grid(name: str, bits: int, symmetric: bool, scale: list[float], zero: list[float],
                       qmin: int, block_size: int | None = None) -> Encoding:
    """From Kiln's signed/unsigned grids (real = scale * (q - zero), q ≥ qmin) to AIMET offsets."""
    return Encoding(name, bits, symmetric, tuple(float(s) for s in scale),
                    tuple(int(qmin - z) for z in zero), block_size)


def float16(name: str) -> Encoding:
    return Encoding(name, 16, True, (), ())


def _v1(e: Encoding) -> dict[str, Any]:
    if e.is_float:
        return {"name": e.name, "bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "is_sym": True}
    row = {"name": e.name, "bw": e.bits, "dtype": "INT", "enc_type": e.enc_type, "is_sym": e.symmetric,
           "scale": list(e.scale), "offset": list(e.offset)}
    if e.block_size:
        row["block_size"] = e.block_size
    return row


def _v061(e: Encoding) -> list[dict[str, Any]]:
    if e.block_size:
        raise KilnError(f"encodings 0.6.1 cannot express per-block weights ({e.name}, block {e.block_size}); "
                        "use encodings version 1.0.0")
    if e.is_float:
        return [{"bitwidth": 16, "dtype": "float"}]
    top = 2 ** e.bits - 1
    return [{"bitwidth": e.bits, "dtype": "int", "is_symmetric": str(e.symmetric), "scale": s, "offset": o,
             "min": s * o, "max": s * (top + o)} for s, o in zip(e.scale, e.offset)]


def render(activations: list[Encoding], params: list[Encoding], version: str,
           quantizer_args: dict[str, Any]) -> dict[str, Any]:
    """The encodings document in `version`."""
    if version == "1.0.0":
        return {"version": version, "producer": {"name": "kiln"}, "quantizer_args": quantizer_args,
                "excluded_layers": [],
                "activation_encodings": [_v1(e) for e in activations], "param_encodings": [_v1(e) for e in params]}
    if version == "0.6.1":
        return {"version": version, "quantizer_args": quantizer_args, "excluded_layers": [],
                "activation_encodings": {e.name: _v061(e) for e in activations},
                "param_encodings": {e.name: _v061(e) for e in params}}
    raise KilnError(f"unknown encodings version {version!r}; choose one of {', '.join(VERSIONS)}")


# --- schemas: what a reader of each version may rely on -------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _V1Entry(_Strict):
    name: str = Field(min_length=1)
    bw: Literal[4, 8, 16, 32]
    dtype: Literal["INT", "FLOAT"]
    enc_type: Literal["PER_TENSOR", "PER_CHANNEL", "PER_BLOCK", "LPBQ"]
    is_sym: bool
    scale: list[Annotated[float, Field(gt=0)]] = []
    offset: list[int] = []
    block_size: int | None = Field(None, gt=0)
    compressed_bw: int | None = None
    per_block_int_scale: list[int] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> _V1Entry:
        if self.dtype == "FLOAT":
            if self.scale or self.offset or self.bw not in (16, 32) or self.enc_type != "PER_TENSOR":
                raise ValueError(f"{self.name}: a FLOAT encoding is PER_TENSOR, 16/32 bits, without scale/offset")
            return self
        if not self.scale:
            raise ValueError(f"{self.name}: an INT encoding needs scale and offset")
        if len(self.scale) != len(self.offset):
            raise ValueError(f"{self.name}: {len(self.scale)} scales but {len(self.offset)} offsets")
        if self.enc_type == "PER_TENSOR" and len(self.scale) != 1:
            raise ValueError(f"{self.name}: PER_TENSOR with {len(self.scale)} scales")
        if (self.enc_type in ("PER_BLOCK", "LPBQ")) != (self.block_size is not None):
            raise ValueError(f"{self.name}: block_size goes with PER_BLOCK/LPBQ only")
        low = -(2 ** self.bw - 1)
        if any(not low <= o <= 0 for o in self.offset):
            raise ValueError(f"{self.name}: offsets must lie in [{low}, 0] for {self.bw} bits")
        if self.is_sym and any(o != -(2 ** (self.bw - 1)) for o in self.offset):
            raise ValueError(f"{self.name}: a symmetric encoding has offset {-(2 ** (self.bw - 1))}")
        return self


class _V1Doc(_Strict):
    version: Literal["1.0.0"]
    producer: dict[str, Any] | None = None
    quantizer_args: dict[str, Any] | None = None
    excluded_layers: list[str] = []
    activation_encodings: list[_V1Entry]
    param_encodings: list[_V1Entry]

    @model_validator(mode="after")
    def _unique(self) -> _V1Doc:
        names = [e.name for e in self.activation_encodings + self.param_encodings]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate names: {sorted({n for n in names if names.count(n) > 1})[:5]}")
        return self


class _V061Entry(_Strict):
    bitwidth: Literal[4, 8, 16, 32]
    dtype: Literal["int", "float"]
    is_symmetric: Literal["True", "False"] | None = None
    scale: float | None = Field(None, gt=0)
    offset: int | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _range(self) -> _V061Entry:
        given = [v is not None for v in (self.is_symmetric, self.scale, self.offset, self.min, self.max)]
        if self.dtype == "float":
            if any(given):
                raise ValueError("a float encoding has no is_symmetric/scale/offset/min/max")
            return self
        if not all(given):
            raise ValueError("an int encoding needs is_symmetric, scale, offset, min and max")
        if abs(self.min - self.scale * self.offset) > 1e-6 * max(1.0, abs(self.min)):
            raise ValueError(f"min {self.min} != scale * offset {self.scale * self.offset}")
        if not self.min <= 0 <= self.max:
            raise ValueError(f"range [{self.min}, {self.max}] must contain 0")
        return self


class _V061Doc(_Strict):
    version: Literal["0.6.1"]
    quantizer_args: dict[str, Any] | None = None
    excluded_layers: list[str] = []
    activation_encodings: dict[str, list[_V061Entry]]
    param_encodings: dict[str, list[_V061Entry]]


def validate(doc: dict[str, Any], where: str) -> str:
    """Check an encodings document against its version's schema; return the version."""
    version = doc.get("version") if isinstance(doc, dict) else None
    schema = {"1.0.0": _V1Doc, "0.6.1": _V061Doc}.get(version)  # type: ignore[arg-type]
    if schema is None:
        raise KilnError(f"{where}: version: {version!r} is not an encodings version Kiln knows ({', '.join(VERSIONS)})")
    try:
        schema.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        path = ".".join(str(p) for p in first["loc"])
        raise KilnError(f"{where}: {path}: {first['msg']} ({e.error_count()} problem(s))") from None
    return version


def write(path: Path, doc: dict[str, Any]) -> None:
    validate(doc, str(path))
    path.write_text(json.dumps(doc, indent=1) + "\n")


def parse_v1(doc: dict[str, Any], where: str) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
    """Activation and param encodings of a 1.0.0 document (validated first), by tensor name."""
    if validate(doc, where) != "1.0.0":
        raise KilnError(f"{where}: version: Kiln reads encodings 1.0.0 back, not {doc['version']}")

    def one(e: dict[str, Any]) -> Encoding:
        if e["dtype"] == "FLOAT":
            return float16(e["name"])
        if e["enc_type"] == "LPBQ":
            raise KilnError(f"{where}: {e['name']}: LPBQ encodings are not supported by Kiln's QDQ builder")
        return Encoding(e["name"], e["bw"], e["is_sym"], tuple(float(s) for s in e["scale"]),
                        tuple(int(o) for o in e["offset"]), e.get("block_size"))

    return ({e["name"]: one(e) for e in doc["activation_encodings"]},
            {e["name"]: one(e) for e in doc["param_encodings"]})


def check_device_rules(activations: dict[str, Encoding], params: dict[str, Encoding], kv_bits: int,
                       conv_weights: set[str], where: str) -> None:
    """What HTP and Genie need of the encodings, whichever engine made them (docs/qualcomm.md#htp-numerics):
    every past_*_in/_out pair has one encoding of `kv_bits` (Genie copies KV bytes raw), int8
    Conv weights are symmetric, int4 weights are per-channel or per-block (never per-tensor)."""
    problems = []
    for name in sorted(n for n in activations if n.startswith("past_") and n.endswith("_in")):
        pair = name[:-3] + "_out"
        e, f = activations[name], activations.get(pair)
        if f is None or (e.bits, e.symmetric, e.scale, e.offset) != (f.bits, f.symmetric, f.scale, f.offset):
            problems.append(f"{name} and {pair} must share one encoding")
        elif kv_bits < 32 and e.bits != kv_bits:
            problems.append(f"{name}: {e.bits}-bit, the scheme's kv_cache is {kv_bits}-bit")
    for name in sorted(conv_weights & set(params)):
        e = params[name]
        if e.bits == 8 and not e.symmetric:
            problems.append(f"{name}: int8 weights must be symmetric on HTP")
        if e.bits == 4 and e.enc_type == "PER_TENSOR":
            problems.append(f"{name}: int4 weights must be per-channel or per-block on HTP")
    if problems:
        raise KilnError(f"{where}: {len(problems)} encoding(s) the device would reject: " + "; ".join(problems[:5]))
