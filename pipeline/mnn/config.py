"""mnn.config: config.json, MNN's runtime settings for the export, rendered from
templates/mnn/config.json.j2 (the keys of MNN's llmexport guide).

Backend, threads, precision, memory policy, generation length, KV reuse and quantization, mmap and
the sampler are this stage's params: a tweak reruns this stage and the bundle only. The rendered
file is checked by loading the export with it in MNN's engine (host CPU) before it is published.
The export's llm_config.json (the model's description: hidden size, layers, chat template, tied
embedding layout) is mnn.export's and is shipped as exported; MNN merges it under config.json.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pipeline.engine.stage import Stage, StageContext
from pipeline.engine.templating import ShipsTemplates
from pipeline.mnn.runtime import CONFIG, EXPORT, RUNTIME, MnnConfigParams

if TYPE_CHECKING:
    pass


class MnnConfig(ShipsTemplates, Stage):
    """config.json for MNN's LLM engine, checked by loading the export with it."""

    name = CONFIG
    version = 1
    Params = MnnConfigParams
    tools = ("python", "jinja2", "mnn")
    templates_used = ("mnn/config.json.j2",)

    runtimes = (RUNTIME,)

    requires = (EXPORT,)

    def run(self, ctx: StageContext) -> None:
        from pipeline.mnn.runtime import host_config, loaded, render_config

        p = ctx.params
        config = render_config(p)
        (ctx.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        with loaded(ctx.inputs[EXPORT], host_config(config, 1), ctx.tmp / "check") as llm:
            n = len(llm.encode("Hello"))
        ctx.log.info(f"config.json: {p['backend_type']}, {p['thread_num']} threads, precision {p['precision']}, "
                     f"memory {p['memory']}, sampler {p['sampler']['type']}; MNN loaded the export with it "
                     f"(host CPU; tokenizer: {n} tokens for 'Hello')")
