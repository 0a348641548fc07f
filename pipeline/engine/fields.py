"""String types for recipe fields, each as narrow as where its value lands allows.

A recipe value ends up in file names, shell scripts (`run.sh`, adb's remote shell), CMake files,
JSON configs and READMEs. Templates quote what they paste (`shquote`, `tojson`, `cmake_quote`);
these types make sure values are also of the shape they claim, so a description cannot start a
new line of a script and a CPU name cannot close a CMake call.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints

NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"

# One line of prose (descriptions, marketing names): no newline or other control character.
OneLine = Annotated[str, StringConstraints(pattern=NO_CONTROL, max_length=300)]
# Text a model reads (prompts, questions): lines and tabs, no other control character.
Prompt = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$", max_length=8000)]
# A name of a thing (CPU core, -march value, build type, cmake target, SoC part number).
Token = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")]
OptionalToken = Annotated[str, StringConstraints(pattern=r"^([A-Za-z0-9][A-Za-z0-9._+-]{0,63})?$")]  # "" = unset
# A path on this machine the recipe reads from: any characters but control ones.
LocalPath = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]+$", max_length=4096)]
# An absolute folder on the device: plain characters only (it is pasted into adb's remote shell).
DeviceDir = Annotated[str, StringConstraints(pattern=r"^(/[A-Za-z0-9._-]+)+/?$", max_length=255)]
# A Hugging Face repo id (`org/name`) and a revision (branch, tag or commit).
HubId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=200)]
# A file inside a source tree, relative to one of its folders: plain names, no `..`, no leading `/`.
TreeFile = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*$",
                                            max_length=255)]
Revision = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")]
# A cmake -D option: `-DNAME=value` or `-DNAME:TYPE=value`, value without spaces or shell/CMake syntax.
CmakeDefine = Annotated[str, StringConstraints(pattern=r"^-D[A-Za-z_][A-Za-z0-9_]*(:[A-Z]+)?=[A-Za-z0-9._+,/=-]*$")]
