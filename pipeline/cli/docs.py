"""docs: the stage catalog and the recipe reference, generated from the registry and the schemas."""
from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

from pipeline.recipe.load import recipe_model
from pipeline.recipe.schema import SchemeSpec, TargetSpec
from pipeline.registry import all_stages, backend

GENERATED = "Generated from the code by `python -m pipeline docs --write docs/reference.md`; do not edit by hand."


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "`") for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is typing.Annotated:  # a constrained type (Annotated[int, Field(ge=1)]): its base
        return _type_name(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _submodels(a)]


def _show(value: Any) -> str:
    if isinstance(value, BaseModel):
        fields = value.model_dump(mode="json", exclude_defaults=False)
        text = json.dumps(fields, separators=(", ", ": "))
        return "see below" if len(text) > 80 else f"`{text}`"
    return "`" + json.dumps(to_jsonable_python(value)) + "`"


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        if field.is_required():
            default = "required"
        else:
            value = field.default_factory() if field.default_factory is not None else field.default
            default = "—" if value is PydanticUndefined else _show(value)
        desc = (field.description or "").replace("\n", " ").replace("|", "\\|")
        out.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | {desc} |")
        for sub in _submodels(field.annotation):
            if sub not in (TargetSpec, SchemeSpec):
                out.extend(rows(sub, key + "."))
    return out


BACKENDS = {"generic": "Backend-neutral", "qnn": "Qualcomm (QNN/QAIRT + Genie)", "llamacpp": "llama.cpp",
            "mnn": "MNN", "kuiper": "Hand-written int8 runtimes (KuiperLLama's format)"}


def stage_catalog() -> str:
    """Every registered stage under its backend: name, module, runtimes, version, what it does."""
    out = []
    for key, title in BACKENDS.items():
        stages = [c for c in all_stages() if backend(c.name) == key]
        out += [f"### {title}", "", "| stage | module | runtimes | version | does |", "|---|---|---|---:|---|"]
        for c in stages:
            doc = " ".join((c.__doc__ or "").split()).replace("|", "\\|")
            module = c.__module__.replace(".", "/") + ".py"
            out.append(f"| `{c.name}` | `{module}` | {', '.join(c.runtimes) or 'all'} | {c.version} | {doc} |")
        out.append("")
    return "\n".join(out)


def reference() -> str:
    """docs/reference.md: the stage catalog and the recipe, target and scheme keys."""
    head = "| key | type | default | description |\n|---|---|---|---|\n"
    parts = [
        f"# Reference\n\n{GENERATED}\n",
        "## Stages\n\nA stage `<backend>.<verb>` lives in `pipeline/<backend>/<verb>.py`; `model`, `text` and `bundle` "
        "in `pipeline/generic/`. A recipe gets the stages of its target's runtime.\n\n" + stage_catalog(),
        "## Recipe (`recipes/<name>.yaml`; `extends: <base>` or a list of bases is merged first)\n\n"
        + head + "\n".join(rows(recipe_model(all_stages()))),
        "## Target (`recipes/targets/<name>.yaml`, or inline `target: {use: <name>, ...}`)\n\n"
        + head + "\n".join(rows(TargetSpec)),
        "## Scheme (`recipes/schemes/<name>.yaml`, or inline `scheme: {use: <name>, ...}`)\n\n"
        + head + "\n".join(rows(SchemeSpec)),
    ]
    return "\n\n".join(parts) + "\n"


def add_parser(sub) -> None:
    p = sub.add_parser("docs", help=__doc__)
    p.add_argument("--write", type=Path, metavar="FILE", help="write the reference to FILE (docs/reference.md)")
    p.set_defaults(func=_main)


def _main(args, settings) -> int:
    if args.write:
        args.write.write_text(reference())
    else:
        print(reference(), end="")
    return 0
