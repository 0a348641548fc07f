"""Qualcomm Genie: its configs, rendered from templates, and its real runtime (libGenie's C API).

onnxruntime-qnn ships an x86_64 `libGenie.so` (Genie API 1.21; docs/qualcomm.md#genie). Kiln uses it twice:
- `GenieDialogConfig_createFromJson` is Genie's own schema check of a dialog config, offline:
  every rendered `htp-model-config-*.json` goes through it;
- a dialog over unshared context binaries runs on the x86 HTP simulator (`verify`).
libGenie reports errors on stdout/stderr, not through its return codes, so calls run with both
file descriptors captured.
"""
from __future__ import annotations

import ctypes
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.engine.errors import KilnError
from pipeline.engine.templating import TEMPLATES, render

GENIE_TEMPLATES = TEMPLATES / "genie"
DIALOG_TEMPLATE = "htp-model-config.json.j2"
EXT_TEMPLATE = "htp_backend_ext_config.json.j2"
EXT_SCHEMA = "htp_backend_ext_config.schema.json"
STATUS = {0: "success", -1: "general error", -2: "invalid argument", -3: "out of memory", -4: "invalid handle",
          -5: "bound handle", -6: "GenieDialog_query aborted", -7: "malformed JSON", -8: "schema violation"}


class GenieError(KilnError):
    """libGenie refused a config or failed a call; the message carries what it printed."""


def sdk_versions() -> list[str]:
    """SDK versions that have templates (their Genie config schemas differ)."""
    return sorted(p.name for p in GENIE_TEMPLATES.iterdir() if (p / DIALOG_TEMPLATE).exists())


def template_dir(sdk: str) -> str:
    if sdk not in sdk_versions():
        raise KilnError(f"no Genie templates for QAIRT SDK {sdk!r} (templates/genie/ has {', '.join(sdk_versions())})")
    return f"genie/{sdk}"


def render_configs(sdk: str, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dialog config, HTP backend extension config) rendered from the SDK's templates."""
    folder = template_dir(sdk)
    return (json.loads(render(f"{folder}/{DIALOG_TEMPLATE}", **values)),
            json.loads(render(f"{folder}/{EXT_TEMPLATE}", **values)))


def check_ext_config(sdk: str, config: dict[str, Any]) -> None:
    """The backend extension config against the JSON Schema kept with its template."""
    import jsonschema

    schema = json.loads((GENIE_TEMPLATES / sdk / EXT_SCHEMA).read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        raise KilnError("htp_backend_ext_config.json: " + "; ".join(
            f"at '/{'/'.join(map(str, e.path))}': {e.message}" for e in errors))


@cache
def library() -> ctypes.CDLL:
    from pipeline.qnn.ort_qnn import package_dir

    lib = ctypes.CDLL(str(package_dir() / "libGenie.so"))
    handle_out = ctypes.POINTER(ctypes.c_void_p)
    lib.GenieDialogConfig_createFromJson.argtypes = [ctypes.c_char_p, handle_out]
    lib.GenieDialogConfig_free.argtypes = [ctypes.c_void_p]
    lib.GenieDialog_create.argtypes = [ctypes.c_void_p, handle_out]
    lib.GenieDialog_free.argtypes = [ctypes.c_void_p]
    lib.GenieDialog_setMaxNumTokens.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.GenieDialog_query.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, QUERY_CALLBACK, ctypes.c_void_p]
    return lib


def api_version() -> str:
    lib = library()
    return f"{lib.Genie_getApiMajorVersion()}.{lib.Genie_getApiMinorVersion()}"


QUERY_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p)


@contextmanager
def captured_output() -> Iterator[list[str]]:
    """What the process writes to fds 1 and 2 meanwhile (libGenie prints its errors there)."""
    sink: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        saved = [os.dup(1), os.dup(2)]
        try:
            for fd in (1, 2):
                os.dup2(tmp.fileno(), fd)
            yield sink
        finally:
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))


def _check(status: int, what: str, printed: list[str]) -> None:
    if status != 0:
        detail = "".join(printed).strip()
        raise GenieError(f"{what}: {STATUS.get(status, status)} ({status})" + (f": {detail}" if detail else ""))


@contextmanager
def dialog_config(config: dict[str, Any], what: str = "dialog config") -> Iterator[ctypes.c_void_p]:
    """A GenieDialogConfig handle for `config`, checked by Genie's own schema."""
    lib = library()
    handle = ctypes.c_void_p()
    with captured_output() as printed:
        status = lib.GenieDialogConfig_createFromJson(json.dumps(config).encode(), ctypes.byref(handle))
    _check(status, f"Genie rejects the {what}", printed)
    try:
        yield handle
    finally:
        lib.GenieDialogConfig_free(handle)


def check_dialog_config(config: dict[str, Any], what: str = "dialog config") -> None:
    with dialog_config(config, what):
        pass


class Dialog:
    """A Genie dialog (GenieDialog_create) whose queries return the generated text. Relative
    paths in the config (tokenizer, ctx-bins, extensions) resolve against `cwd`."""

    def __init__(self, config: dict[str, Any], cwd: Path) -> None:
        self.config, self.cwd = config, cwd
        self.log = ""

    def __enter__(self) -> Dialog:
        lib = library()
        self._handle = ctypes.c_void_p()
        self._old_cwd = os.getcwd()
        os.chdir(self.cwd)
        try:
            with dialog_config(self.config) as cfg, captured_output() as printed:
                status = lib.GenieDialog_create(cfg, ctypes.byref(self._handle))
            self.log += "".join(printed)
            _check(status, "GenieDialog_create", printed)
        except BaseException:
            os.chdir(self._old_cwd)
            raise
        return self

    def query(self, prompt: str, max_tokens: int) -> tuple[str, int]:
        """(generated text, tokens generated: one callback per token)."""
        lib = library()
        pieces: list[bytes] = []

        @QUERY_CALLBACK
        def on_text(text: bytes | None, code: int, _: Any) -> None:
            if text:
                pieces.append(text)

        _check(lib.GenieDialog_setMaxNumTokens(self._handle, max_tokens), "GenieDialog_setMaxNumTokens", [])
        with captured_output() as printed:
            status = lib.GenieDialog_query(self._handle, prompt.encode(), 0, on_text, None)  # 0: complete sentence
        self.log += "".join(printed)
        _check(status, "GenieDialog_query", printed)
        return b"".join(pieces).decode(errors="replace"), len(pieces)

    def __exit__(self, *exc: Any) -> None:
        try:
            library().GenieDialog_free(self._handle)
        finally:
            os.chdir(self._old_cwd)


def model_values(model_dir: Path, context_size: int) -> dict[str, Any]:
    """What a dialog config takes from the HF checkpoint: vocabulary, special tokens, KV and RoPE."""
    cfg = json.loads((model_dir / "config.json").read_text())
    gen_file = model_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos = sorted(set(eos if isinstance(eos, list) else [eos] if eos is not None else []))
    if not eos:
        raise KilnError(f"{model_dir / 'config.json'}: eos_token_id: missing; Genie needs an end-of-sequence token")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0), **(cfg.get("rope_scaling") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope["rope_theta"]
    scaling = None
    if kind == "llama3":
        scaling = {"type": "llama3", **{k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                              "original_max_position_embeddings")}}
    elif kind != "default":
        raise KilnError(f"{model_dir / 'config.json'}: rope_type {kind!r}: Genie configs support default and llama3 RoPE")
    bos = cfg.get("bos_token_id")
    return {"context_size": context_size, "n_vocab": cfg["vocab_size"], "bos_token": -1 if bos is None else bos,
            "eos_tokens": eos, "kv_dim": head_dim,
            "rope": {"dim": head_dim // 2, "theta": int(theta) if float(theta).is_integer() else theta,
                     "scaling": scaling}}


def config_name(model: str) -> str:
    """The dialog config's file name in the bundle."""
    return f"htp-model-config-{model.lower()}.json"


def genie_values(p: dict[str, Any], model_dir: Any, ctx_bins: list[str], weight_sharing: bool) -> dict[str, Any]:
    """Template values: the stage's params, the model's, and which binaries the dialog loads."""
    return {**model_values(model_dir, p["context_length"]), "sampler": p["sampler"], "tokenizer_path": "tokenizer.json",
            "n_threads": p["n_threads"], "use_mmap": p["use_mmap"], "spill_fill_bufsize": p["spill_fill_bufsize"],
            "mmap_budget": p["mmap_budget"], "poll": p["poll"], "cpu_mask": p["cpu_mask"],
            "allow_async_init": p["allow_async_init"], "ext_config_path": "htp_backend_ext_config.json",
            "ctx_bins": ctx_bins, "soc_model": p["soc_model"], "dsp_arch": p["dsp_arch"], "cores": p["cores"],
            "mem_type": p["mem_type"], "weight_sharing": weight_sharing}
