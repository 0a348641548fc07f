"""Jinja rendering, sandboxed with StrictUndefined (a missing value is an error, not '')."""
from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from jinja2.sandbox import SandboxedEnvironment

from pipeline import ROOT

TEMPLATES = ROOT / "templates"


@cache
def environment(root: Path = TEMPLATES) -> SandboxedEnvironment:
    # Imported here: planning reads TEMPLATES but must not pay for jinja2.
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(loader=FileSystemLoader(str(root)), undefined=StrictUndefined,
                               keep_trailing_newline=True, autoescape=False)
    # Recipe values rendered into shell scripts (run.sh) go through `| shquote`: one word, never code;
    # into CMake files through `| cmake_quote`; into JSON through `| tojson`.
    env.filters["shquote"] = shlex.quote
    env.filters["cmake_quote"] = cmake_quote
    # Values in a script's or CMake file's comment: the schema already refuses newlines in them;
    # this keeps a comment one line whatever a future field lets through.
    env.filters["oneline"] = lambda value: re.sub(r"[\x00-\x1f\x7f]", " ", str(value))
    return env


def cmake_quote(value: object) -> str:
    """A CMake quoted argument holding exactly `value`: no variable reference, no list split, no
    generator expression, no end of the call."""
    text = str(value)
    for char, escaped in (("\\", "\\\\"), ('"', '\\"'), ("$", "\\$"), (";", "\\;"), ("\n", "\\n"), ("\r", "\\r")):
        text = text.replace(char, escaped)
    return f'"{text}"'


def render(template: str, **values: Any) -> str:
    return environment().get_template(template).render(**values)


class ShipsTemplates:
    """Mixin for a stage that renders the device-side files of a bundle (run.sh, README) from
    `templates_used`: those templates are its sources, and its output goes to the bundle's top."""

    templates_used: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def sources(cls, recipe: Any, variant: str = "") -> dict[str, Path]:
        return {t: TEMPLATES / t for t in cls.templates_used}

    @classmethod
    def ships(cls, recipe: Any, variant: str = "") -> str | None:
        return "."
