"""`llama-bench -o json` output from a board, read for `python -m pipeline perf`: one row per
model and thread count, its prompt test (-p) beside its generation test (-n), in the shape of a
Genie profile's summary (pipeline/qnn/genie_profile.py) so both kinds of device run share the
device page. Bounded and validated: it is a file from outside."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.engine.errors import KilnError

if TYPE_CHECKING:
    from pathlib import Path

MAX_BYTES = 1 << 20


class BenchRow(BaseModel):
    model_config = ConfigDict(extra="ignore")  # llama-bench adds fields between versions

    model_filename: str = Field(max_length=4096)
    model_type: str = Field(max_length=200)
    cpu_info: str = Field("", max_length=500)
    n_threads: int = Field(ge=1, le=4096)
    n_prompt: int = Field(ge=0, le=1 << 20)
    n_gen: int = Field(ge=0, le=1 << 20)
    avg_ts: float = Field(gt=0, le=1e7)


def gguf_type(model_type: str) -> str:
    """`llama 8B Q2_K - Medium` → `Q2_K` (llama-bench's model_type ends with the file type)."""
    words = model_type.replace(" - ", " ").split()
    return next((w for w in words if w[:1] in "QFBI" and any(c.isdigit() for c in w)), words[-1] if words else "?")


def read(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_BYTES:
        raise KilnError(f"{path}: over {MAX_BYTES} bytes: not a llama-bench result")
    try:
        rows = [BenchRow.model_validate(r) for r in json.loads(path.read_text())]
    except json.JSONDecodeError as e:
        raise KilnError(f"{path}:{e.lineno}: not JSON: {e.msg}") from None
    except (ValidationError, TypeError) as e:
        raise KilnError(f"{path}: not `llama-bench -o json` output ({str(e).splitlines()[0]})") from None
    runs: dict[tuple[str, int], dict[str, BenchRow]] = {}
    for r in rows:
        kind = "pp" if r.n_prompt and not r.n_gen else "tg" if r.n_gen and not r.n_prompt else None
        if kind:
            runs.setdefault((r.model_filename, r.n_threads), {})[kind] = r
    queries = []
    for (_, threads), tests in runs.items():
        if set(tests) != {"pp", "tg"}:
            raise KilnError(f"{path}: each model needs a prompt test (-p N) and a generation test (-n N)")
        pp, tg = tests["pp"], tests["tg"]
        queries.append({"component": f"{gguf_type(pp.model_type)} ({pp.model_type}, {threads} threads)",
                        "type": gguf_type(pp.model_type), "cpu": pp.cpu_info,
                        "prompt_tokens": pp.n_prompt, "prompt_tokens_per_s": pp.avg_ts,
                        "time_to_first_token_ms": 1000 * pp.n_prompt / pp.avg_ts,  # the prompt's processing time
                        "generated_tokens": tg.n_gen, "generated_tokens_per_s": tg.avg_ts,
                        "generation_ms": 1000 * tg.n_gen / tg.avg_ts})
    if not queries:
        raise KilnError(f"{path}: no prompt or generation test in it")
    return {"init_ms": None, "queries": queries, "kind": "llama-bench"}
