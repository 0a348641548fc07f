"""Genie's `--profile perf.json` (genie-t2t-run on the phone; format in docs/qualcomm.md) read into Kiln's reports.

The file: a header (`artifact_type: GENIE_PROFILE`), then components (a dialog) whose events are
GenieDialog_create (init-time), one GenieDialog_query per prompt (num-prompt-tokens,
prompt-processing-rate, time-to-first-token, num-generated-tokens, token-generation-rate,
token-generation-time; each {value, unit}) and GenieDialog_free. Unknown keys are kept out of
the summary but do not fail the read: newer Genie versions add events and fields.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.engine.errors import KilnError


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Measure(_Open):
    value: float
    unit: str = ""


class Event(_Open):
    type: str
    duration: int | None = None
    init_time: Measure | None = Field(None, alias="init-time")
    num_prompt_tokens: Measure | None = Field(None, alias="num-prompt-tokens")
    prompt_processing_rate: Measure | None = Field(None, alias="prompt-processing-rate")
    time_to_first_token: Measure | None = Field(None, alias="time-to-first-token")
    num_generated_tokens: Measure | None = Field(None, alias="num-generated-tokens")
    token_generation_rate: Measure | None = Field(None, alias="token-generation-rate")
    token_generation_time: Measure | None = Field(None, alias="token-generation-time")


class Component(_Open):
    name: str
    type: str
    events: list[Event]


class Header(_Open):
    artifact_type: Literal["GENIE_PROFILE"]


class Profile(_Open):
    header: Header
    components: list[Component]


QUERY_FIELDS = ("num_prompt_tokens", "prompt_processing_rate", "time_to_first_token", "num_generated_tokens",
                "token_generation_rate", "token_generation_time")
US = {"us": 1e-3, "ms": 1.0, "s": 1e3}  # to milliseconds


def _ms(m: Measure) -> float:
    if m.unit not in US:
        raise KilnError(f"unknown time unit {m.unit!r}")
    return m.value * US[m.unit]


def read(path: Path) -> dict[str, Any]:
    """The summary of one perf.json: init time and one row per query (times in ms)."""
    try:
        profile = Profile.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise KilnError(f"{path}:{e.lineno}: not JSON: {e.msg}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise KilnError(f"{path}: {where}: {first['msg']} (not a Genie profile?)") from None
    init, queries = None, []
    for component in profile.components:
        for event in component.events:
            if event.type == "GenieDialog_create" and event.init_time is not None:
                init = _ms(event.init_time)
            elif event.type == "GenieDialog_query":
                missing = [f for f in QUERY_FIELDS if getattr(event, f) is None]
                if missing:
                    names = ", ".join(Event.model_fields[f].alias or f for f in missing)
                    raise KilnError(f"{path}: {component.name}: a GenieDialog_query lacks {names}")
                queries.append({
                    "component": component.name,
                    "prompt_tokens": int(event.num_prompt_tokens.value),
                    "prompt_tokens_per_s": event.prompt_processing_rate.value,
                    "time_to_first_token_ms": _ms(event.time_to_first_token),
                    "generated_tokens": int(event.num_generated_tokens.value),
                    "generated_tokens_per_s": event.token_generation_rate.value,
                    "generation_ms": _ms(event.token_generation_time),
                })
    if not queries:
        raise KilnError(f"{path}: no GenieDialog_query event: was genie-t2t-run given a prompt?")
    return {"init_ms": init, "queries": queries}


def table(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per query of every labelled run."""
    lines = ["| run | prompt tokens | prompt tok/s | time to first token (ms) | generated tokens | "
             "generation tok/s | init (ms) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, run in runs.items():
        init = "—" if run["init_ms"] is None else f"{run['init_ms']:.0f}"
        lines += [f"| {label} | {q['prompt_tokens']} | {q['prompt_tokens_per_s']:.1f} | {q['time_to_first_token_ms']:.1f} "
                  f"| {q['generated_tokens']} | {q['generated_tokens_per_s']:.2f} | {init} |" for q in run["queries"]]
    return "\n".join(lines) + "\n"
