"""Recipe loading: YAML → `extends` merge → target/scheme resolution → typed validation.

Errors name the file, the line and the field path, and suggest close names.
The result, `Recipe`, is what the planner reads; its canonical form (validated
values, defaults filled) is what enters keys, so comments, key order or an
`extends` that yields the same values change nothing.
"""
from __future__ import annotations

import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from pipeline.engine.errors import RecipeError, did_you_mean
from pipeline.engine.fields import OneLine
from pipeline.engine.settings import Settings
from pipeline.recipe.schema import ALIAS_PATTERN, EvalSpec, ModelSpec, SchemeSpec, TargetSpec, TextSpec
from pipeline.recipe.yamlpos import FieldPath, Location, deep_merge, format_path, load_located

if TYPE_CHECKING:
    from pipeline.engine.stage import Stage

Positions = dict[FieldPath, Location]
RECIPE_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"  # a buildable recipe: it names artifacts/<recipe>/ and files
REF_NAME = r"_?" + RECIPE_NAME                   # what `extends:`, `target:` and `scheme:` may name


@cache
def recipe_model(stages: tuple[type[Stage], ...]) -> type[BaseModel]:
    """The recipe schema: fixed top-level keys plus one `stages.<name>` section per stage given."""
    stage_fields: dict[str, Any] = {
        _field(cls.name): (cls.Params, Field(default_factory=cls.Params, alias=cls.name,
                                             description=(cls.__doc__ or "").strip()))
        for cls in sorted(stages, key=lambda c: c.name)
    }
    stage_params = create_model(
        "StageParams", __config__=ConfigDict(extra="forbid", frozen=True, strict=True), **stage_fields
    )
    return create_model(
        "RecipeSpec",
        __config__=ConfigDict(extra="forbid", frozen=True, strict=True),
        description=(OneLine, Field("", description="One line shown by `doit list` and in reports.")),
        model=(ModelSpec, Field(description="The model to build from.")),
        target=(TargetSpec, Field(description="Target name from recipes/targets/, or `{use: name, ...overrides}`.")),
        scheme=(SchemeSpec, Field(description="Scheme name from recipes/schemes/, or `{use: name, ...overrides}`.")),
        context_length=(int, Field(4096, ge=16, le=131072, description="KV-cache length (tokens) of exported graphs.")),
        ar_lengths=(list[Annotated[int, Field(ge=1)]], Field([128, 1], min_length=1,
                                     description="AR (tokens per step) variants: prefill and decode graphs.")),
        text=(TextSpec, Field(default_factory=TextSpec, description="Calibration and evaluation text.")),
        eval=(EvalSpec, Field(default_factory=EvalSpec, description="Evaluation: perplexity protocol, tasks, latency.")),
        stages=(stage_params, Field(default_factory=stage_params, description="Per-stage settings, by stage name.")),
    )


def _field(stage: str) -> str:
    """The schema attribute of a stage's section (aliases carry the dotted name)."""
    return stage.replace(".", "_")


@dataclass(frozen=True)
class Recipe:
    name: str
    file: Path
    spec: Any  # an instance of recipe_model(stages)
    positions: Positions
    settings: Settings
    stages: tuple[type[Stage], ...]  # the stages it was validated against; the plan draws from them
    notes: tuple[str, ...] = ()  # said once when the recipe is built (e.g. "target gen4 → sm8750")

    @property
    def model(self) -> ModelSpec:
        return self.spec.model

    @property
    def target(self) -> TargetSpec:
        return self.spec.target

    @property
    def scheme(self) -> SchemeSpec:
        return self.spec.scheme

    def stage_params(self, stage: str) -> dict[str, Any]:
        return getattr(self.spec.stages, _field(stage)).model_dump(mode="json")

    def resolve_path(self, value: str) -> Path:
        """Recipe paths are relative to the repository root (where dodo.py is)."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.settings.root / p

    def where(self, *path: str | int) -> str:
        """'file:line' of a field, for error messages raised after validation."""
        loc = _nearest(self.positions, tuple(path))
        return str(loc) if loc else self.settings.shown(self.file)


def available(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml") if not p.stem.startswith("_"))


def load_recipe(name: str, settings: Settings | None,
                stages: Sequence[type[Stage]] | Callable[[dict[str, Any]], Sequence[type[Stage]]]) -> Recipe:
    """Read, merge and validate `recipes/<name>.yaml` against the fixed keys and `stages`' params
    (or the stages `stages` picks for the merged document, its target resolved)."""
    settings = settings or Settings.from_env()
    if not re.fullmatch(RECIPE_NAME, name):
        raise RecipeError(f"recipe name {name!r}: letters, digits, '_', '-' (the first a letter or digit), "
                          "at most 64 characters: it names folders and files")
    file = settings.recipes_dir / f"{name}.yaml"
    if not file.is_file():
        names = available(settings.recipes_dir)
        raise RecipeError(
            f"unknown recipe {name!r}{did_you_mean(name, names)}; recipes in "
            f"{settings.shown(settings.recipes_dir)}: {', '.join(names) or '(none)'}"
        )
    doc, pos = _load_with_extends(_inside(file, settings.recipes_dir, settings.shown(file)), settings, stack=())
    if not isinstance(doc, dict):
        raise RecipeError(f"{settings.shown(file)}:1: a recipe is a mapping of keys to values")
    notes: list[str] = []
    for kind, folder in (("target", "targets"), ("scheme", "schemes")):
        if kind in doc:
            doc[kind], pos = _resolve_ref(kind, doc[kind], settings.recipes_dir / folder, pos, settings, notes)
    stages = tuple(stages(doc) if callable(stages) else stages)
    spec = _validate(recipe_model(stages), doc, pos, settings.shown(file))
    return Recipe(name=name, file=file, spec=spec, positions=pos, settings=settings, stages=stages, notes=tuple(notes))


def _load_with_extends(file: Path, settings: Settings, stack: tuple[Path, ...]) -> tuple[Any, Positions]:
    shown = settings.shown(file)
    if file in stack:
        chain = " -> ".join(settings.shown(f) for f in stack + (file,))
        raise RecipeError(f"{shown}:1: extends: cycle: {chain}")
    doc, pos = load_located(file, shown)
    if not isinstance(doc, dict) or "extends" not in doc:
        return doc, pos
    bases = doc.pop("extends")
    ext_loc = pos.pop(("extends",))
    pos = {p: loc for p, loc in pos.items() if p[0] != "extends"}
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not bases:
        raise RecipeError(f"{ext_loc}: extends: a recipe name or a list of them, got {bases!r}")
    merged: Any = {}
    merged_pos: Positions = {}
    for base in bases:
        names = [p.stem for p in file.parent.glob("*.yaml")]
        if not isinstance(base, str) or not re.fullmatch(REF_NAME, base) or not (file.parent / f"{base}.yaml").is_file():
            raise RecipeError(f"{ext_loc}: extends: no such file {base!r}{did_you_mean(str(base), names)}")
        bdoc, bpos = _load_with_extends(_inside(file.parent / f"{base}.yaml", file.parent, ext_loc), settings,
                                        stack + (file,))
        merged, merged_pos = _merge_docs(merged, bdoc, merged_pos, bpos)
    return _merge_docs(merged, doc, merged_pos, pos)


def _merge_docs(base: Any, over: Any, base_pos: Positions, over_pos: Positions) -> tuple[Any, Positions]:
    """`over` onto `base`; a child that changes some fields of the target or scheme its parent
    names (`scheme: {weights: {bits: 8}}` over `scheme: w4a16_kv8`) builds on that one."""
    if isinstance(base, dict) and isinstance(over, dict):
        for kind in ("target", "scheme"):
            named, changes = base.get(kind), over.get(kind)
            if isinstance(named, str) and isinstance(changes, dict) and "use" not in changes:
                over = {**over, kind: {"use": named, **changes}}
                over_pos = {**over_pos, (kind, "use"): base_pos.get((kind,), Location("?", 1))}
    return deep_merge(base, over, base_pos, over_pos)


def _inside(file: Path, folder: Path, where: object) -> Path:
    """`file`, which must resolve (symlinks followed) inside `folder`."""
    if not file.resolve().is_relative_to(folder.resolve()):
        raise RecipeError(f"{where}: {file.name} resolves to {file.resolve()}, outside {folder}")
    return file


def normal_name(word: str) -> str:
    """How aliases compare: case, spaces, '-', '_' and '.' do not matter ('8 Elite' = '8-elite')."""
    return re.sub(r"[^a-z0-9]", "", word.lower())


def target_names(folder: Path, settings: Settings) -> dict[str, list[str]]:
    """{target: the other names it answers to}: its `aliases`, SoC part number, chip name and HTP arch."""
    names: dict[str, list[str]] = {}
    for name in available(folder):
        doc, _ = _load_with_extends(folder / f"{name}.yaml", settings, stack=())
        if not isinstance(doc, dict):
            continue
        soc = doc.get("soc") if isinstance(doc.get("soc"), dict) else {}
        aliases = doc.get("aliases") if isinstance(doc.get("aliases"), list) else []
        words = [w for w in [*aliases, soc.get("name"), soc.get("chip"), soc.get("dsp_arch")]
                 if isinstance(w, str) and re.fullmatch(ALIAS_PATTERN, w)]  # a bad one fails validation, unlisted
        names[name] = list(dict.fromkeys(w for w in words if normal_name(w) and normal_name(w) != normal_name(name)))
    return names


def target_aliases(folder: Path, settings: Settings) -> dict[str, list[str]]:
    """{normalized alias: the targets it fits}."""
    fits: dict[str, list[str]] = {}
    for target, words in target_names(folder, settings).items():
        for word in [target, *words]:  # its own name in another spelling too ('SM8750')
            if target not in fits.setdefault(normal_name(word), []):
                fits[normal_name(word)].append(target)
    return fits


def _resolve_ref(kind: str, ref: Any, folder: Path, pos: Positions, settings: Settings,
                 notes: list[str]) -> tuple[Any, Positions]:
    """`target: sm8750` or `target: {use: sm8750, soc: {...}}` → the merged mapping; a target may
    also be named by an alias (`gen4`, `v79`), which `notes` records."""
    overrides: dict[str, Any] = {}
    name = ref
    if isinstance(ref, dict):
        overrides = {k: v for k, v in ref.items() if k != "use"}
        name = ref.get("use")
    field = (kind, "use") if isinstance(ref, dict) else (kind,)
    names = available(folder)
    where = _nearest(pos, field) or Location(settings.shown(folder), 1)
    if kind == "target" and isinstance(name, str) and name not in names:
        fits = target_aliases(folder, settings).get(normal_name(name), [])
        if len(fits) > 1:
            raise RecipeError(f"{where}: {format_path(field)}: {name!r} fits several targets: {', '.join(fits)}; "
                              "name one of them")
        if fits:
            notes.append(f"target {name} → {fits[0]}")
            name = fits[0]
    if not isinstance(name, str) or not re.fullmatch(REF_NAME, name) or not (folder / f"{name}.yaml").is_file():
        raise RecipeError(
            f"{where}: {format_path(field)}: unknown {kind} {name!r}{did_you_mean(str(name), names)}; "
            f"known: {', '.join(names)}"
        )
    base, base_pos = _load_with_extends(_inside(folder / f"{name}.yaml", folder, where), settings, stack=())
    if not isinstance(base, dict):
        raise RecipeError(f"{settings.shown(folder / f'{name}.yaml')}:1: expected a mapping")
    base = {**base, "name": name}
    outer = {p: loc for p, loc in pos.items() if p[:1] != (kind,)}
    inner_pos = {(kind,) + p: loc for p, loc in base_pos.items()}
    over_pos = {p: loc for p, loc in pos.items() if p[:1] == (kind,) and p != field}
    merged, merged_pos = deep_merge({kind: base}, {kind: overrides}, inner_pos, over_pos)
    if (kind,) in pos:
        merged_pos[(kind,)] = pos[(kind,)]
    return merged[kind], {**outer, **merged_pos}


def _validate(model: type[BaseModel], doc: dict[str, Any], pos: Positions, shown: str) -> Any:
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        lines = [_format_error(model, err, pos, shown) for err in e.errors()]
        raise RecipeError("\n".join(sorted(set(lines)))) from None


def _format_error(model: type[BaseModel], err: Any, pos: Positions, shown: str) -> str:
    loc: FieldPath = tuple(err["loc"])
    where = _nearest(pos, loc) or Location(shown, 1)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        msg = f"unknown key{did_you_mean(str(loc[-1]), allowed)}; allowed: {', '.join(sorted(allowed))}"
    elif kind == "literal_error":
        expected = err["ctx"]["expected"].replace(" or ", ", ")
        msg = f"expected one of {expected}, got {err['input']!r}"
    elif kind == "missing":
        msg = "required, missing"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if "input" in err and not isinstance(err["input"], dict):
            msg += f", got {err['input']!r}"
    return f"{where}: {format_path(loc)}: {msg}"


def _nearest(pos: Positions, path: FieldPath) -> Location | None:
    while path:
        if path in pos:
            return pos[path]
        path = path[:-1]
    return None


def _fields_at(model: type[BaseModel], path: FieldPath) -> list[str]:
    """The allowed keys of the mapping at `path` in the schema."""
    current: Any = model
    for part in path:
        current = _submodel(current)
        if current is None:
            return []
        by_alias = {(f.alias or n): f for n, f in current.model_fields.items()}
        current = by_alias[part].annotation if part in by_alias else None
    current = _submodel(current)
    return [(f.alias or n) for n, f in current.model_fields.items()] if current else []


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found:
            return found
    return None
