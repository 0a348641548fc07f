"""qnn.package: the phone side of the Genie bundle's `to_device/`, beside qnn.genie_config's two configs.

- `models/weight_sharing_model_1_of_1.serialized.bin` (qnn.compile's shared binary) and its
  EPContext ONNX models (for onnxruntime-qnn on the device instead of Genie);
- `tokenizer.json`; prompt files `lprompt_<N>.txt` of exactly N tokens of held-out text;
- `run.sh`: Qualcomm's walkthrough's `adb push` / `adb shell` / `genie-t2t-run -c ... -p ...` commands, the
  long-prompt runs with `--profile perf.json` and the pull back for `python -m pipeline perf`;
- the QAIRT SDK runtime libraries Genie needs on the phone (not on PyPI for Android): copied
  from `$QNN_SDK_ROOT` when it is set (the SDK version then enters the key), else listed in
  `SDK_LIBRARIES.txt` with where they live in the SDK.
Nothing here depends on the sampler, so a sampler tweak leaves this stage alone.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.errors import KilnError
from pipeline.engine.fields import DeviceDir, Prompt
from pipeline.engine.materialize import link_or_copy
from pipeline.engine.stage import StageContext, Strict
from pipeline.engine.templating import ShipsTemplates
from pipeline.qnn.common import COMPILE, QnnStage, shared_bin, soc_params, split_count
from pipeline.qnn.genie import config_name

if TYPE_CHECKING:
    from pipeline.recipe.load import Recipe

DEVICE_DIR = "/data/local/tmp/{recipe}"


class QnnPackageParams(Strict):
    prompt_tokens: list[int] = Field([1024, 4096], description="Long-prompt files to write, by exact token count "
                                     "(Qualcomm's Genie walkthrough profiles 1024 and 4096).")
    prompt: Prompt = Field("The capital of France is", description="The prompt run.sh's chat answers (prompt.txt).")
    device_dir: DeviceDir | None = Field(None, description="Folder on the phone (default /data/local/tmp/<recipe>).")


def sdk_libraries(dsp_arch: str) -> dict[str, str]:
    """Runtime files Genie needs on an Android phone → their place in the QAIRT SDK."""
    v = dsp_arch.upper()
    return {"genie-t2t-run": "bin/aarch64-android/genie-t2t-run",
            "libGenie.so": "lib/aarch64-android/libGenie.so",
            "libQnnHtp.so": "lib/aarch64-android/libQnnHtp.so",
            "libQnnSystem.so": "lib/aarch64-android/libQnnSystem.so",
            "libQnnHtpNetRunExtensions.so": "lib/aarch64-android/libQnnHtpNetRunExtensions.so",
            f"libQnnHtp{v}Stub.so": f"lib/aarch64-android/libQnnHtp{v}Stub.so",
            f"libQnnHtp{v}Skel.so": f"lib/hexagon-{dsp_arch}/unsigned/libQnnHtp{v}Skel.so"}


class QnnPackage(ShipsTemplates, QnnStage):
    """models/, tokenizer, prompt files, run.sh and the SDK runtime libraries for the phone."""

    name = "qnn.package"
    version = 4  # 2: the binary's libQnnSystem metadata in package.json and README; 3: prompt.txt, not -p '...';
    # 4: package.json lists `binaries` for one part too
    templates_used = ("genie/run.sh.j2", "genie/README.md.j2")
    Params = QnnPackageParams
    per_recipe = True
    tools = ("python", "jinja2", "transformers")

    requires = ("model", "text", COMPILE)

    @classmethod
    def params(cls, recipe: Recipe, variant: str = "") -> dict[str, Any]:
        from pipeline.qnn import qairt

        own = recipe.stage_params(cls.name)
        soc = soc_params(recipe)
        dsp_arch = f"v{soc['htp_arch']}"
        sdk = qairt.sdk_root() if qairt.available() else None
        return {**own, "device_dir": own["device_dir"] or DEVICE_DIR.format(recipe=recipe.name),
                "model": recipe.model.name, "context_length": recipe.spec.context_length,
                "soc": soc["soc"], "dsp_arch": dsp_arch, "config": config_name(recipe.model.name), "parts": split_count(recipe),
                "libraries": sdk_libraries(dsp_arch), "sdk": str(sdk) if sdk else None,
                "sdk_version": qairt.sdk_version(sdk) if sdk else None}

    def run(self, ctx: StageContext) -> None:
        from transformers import AutoTokenizer

        from pipeline.engine.templating import render
        from pipeline.qnn.htp_graph import part_ranges

        p = ctx.params
        models = ctx.out / "models"
        models.mkdir()
        for f in sorted((ctx.inputs[COMPILE] / "shared").iterdir()):
            link_or_copy(f, models / f.name)
        compiled = json.loads((ctx.inputs[COMPILE] / "compile.json").read_text())
        parts = p["parts"]
        layers = part_ranges(json.loads((ctx.inputs["model"] / "config.json").read_text())["num_hidden_layers"], parts)
        binaries = []
        for i, r in enumerate(layers, 1):
            name = shared_bin(i, parts)
            if not (models / name).exists():
                raise KilnError(f"qnn.package: qnn.compile wrote no {name}")
            shared = compiled["binaries"][f"shared/{name}"]
            binaries.append({"file": f"models/{name}", "bytes": shared["bytes"], "provider": compiled["provider"],
                             "soc_model": shared["soc_model"], "htp_arch": shared["info"].get("htp_arch"),
                             "qnn_build": shared["info"].get("build_id"), "graphs": shared["graphs"],
                             **({"layers": f"{r.start}-{r.stop - 1}"} if parts > 1 else {})})
        link_or_copy(ctx.inputs["model"] / "tokenizer.json", ctx.out / "tokenizer.json")

        tokenizer = AutoTokenizer.from_pretrained(ctx.inputs["model"])
        text = (ctx.inputs["text"] / "evaluation.txt").read_text()
        (ctx.out / "prompt.txt").write_text(p["prompt"])  # a file, so no recipe text lands in run.sh
        prompts = {n: exact_prompt(tokenizer, text, n) for n in p["prompt_tokens"]}
        for n, prompt in prompts.items():
            (ctx.out / f"lprompt_{n}.txt").write_text(prompt)

        copied = []
        if p["sdk"]:
            for name, rel in p["libraries"].items():
                src = Path(p["sdk"]) / rel
                if not src.exists():
                    raise KilnError(f"qnn.package: {src} is missing from the QAIRT SDK at QNN_SDK_ROOT={p['sdk']}")
                shutil.copy2(src, ctx.out / name)
                copied.append(name)
        missing = [n for n in p["libraries"] if n not in copied]
        (ctx.out / "SDK_LIBRARIES.txt").write_text(
            "# Genie's runtime for the phone, from Qualcomm's QAIRT SDK (not on PyPI for Android).\n"
            + (f"# Copied from QNN_SDK_ROOT={p['sdk']} (QAIRT {p['sdk_version']}).\n" if copied else
               "# Copy each into this folder from your SDK (or set QNN_SDK_ROOT and rebuild: Kiln copies them):\n")
            + "".join(f"{name}\t$QNN_SDK_ROOT/{rel}\t{'copied' if name in copied else 'ADD'}\n"
                      for name, rel in p["libraries"].items()))
        values = dict(p, recipe=ctx.recipe_name, prompts={n: n < p["context_length"] for n in prompts},
                      missing=missing, binaries=binaries)
        run_sh = ctx.out / "run.sh"
        run_sh.write_text(render("genie/run.sh.j2", **values))
        os.chmod(run_sh, 0o755)
        (ctx.out / "README.md").write_text(render("genie/README.md.j2", **values))
        (ctx.out / "package.json").write_text(json.dumps({
            # as libQnnSystem reads them back (qnn.compile checked them against the recipe); a list
            # whatever the part count, so a reader needs no second shape
            "binaries": binaries,
            "prompts": {n: len(tokenizer(t, add_special_tokens=False)["input_ids"]) for n, t in prompts.items()},
            "sdk_libraries_copied": copied, "sdk_libraries_missing": missing}, indent=2) + "\n")
        ctx.log.info(f"qnn.package: {len(prompts)} prompt files, SDK libraries "
                     + (f"copied from {p['sdk']}" if copied else f"to add: {', '.join(missing)}"))


def exact_prompt(tokenizer: Any, text: str, n: int) -> str:
    """Held-out text that tokenizes (without special tokens) to exactly `n` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n + 32:
        raise KilnError(f"qnn.package: the evaluation text has {len(ids)} tokens, too few for a {n}-token prompt")
    # decode/encode can merge tokens across the cut: try cuts nearest n first
    for cut in sorted(range(n - 32, n + 32), key=lambda c: abs(c - n)):
        prompt = tokenizer.decode(ids[:cut])
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == n:
            return prompt
    raise KilnError(f"qnn.package: no cut of the evaluation text tokenizes to exactly {n} tokens")
