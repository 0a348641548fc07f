"""Exceptions whose message is meant for the user as-is (no traceback)."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class KilnError(Exception):
    """Base of every error Kiln reports to the user without a traceback."""


class RecipeError(KilnError):
    """A recipe, target or scheme file is wrong; the message names file:line: field."""


class StageFailed(KilnError):
    """A stage's process failed; the message names its log and its last lines."""


class StageFlaked(StageFailed):
    """A stage's process failed because a tool did what it is known to do now and then
    (`ToolFlaked`): the runner tries the stage again, `Stage.retries` times at most."""


class ToolFlaked(KilnError):
    """Raised by a stage when a tool failed in a way a rerun is known to get past (QNN's HTP
    compile, now and then); any other error fails the stage at once."""


# The stage process's exit status for ToolFlaked (sysexits' EX_TEMPFAIL)
TRANSIENT_EXIT = 75


class ToolMissing(KilnError):
    """A tool a stage needs is not installed; the message says how to install it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean x?)' for the closest choices, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
