"""Stage modules; importing this package registers every stage.

Adding a stage is adding one module here and listing it below.
"""
from . import (  # noqa: F401  (import registers the stages)
    bundle,
    eval_perplexity,
    export_onnx,
    genie_config,
    genie_package,
    gguf_convert,
    gguf_imatrix,
    gguf_quantize,
    llamacpp_build,
    llamacpp_package,
    llamacpp_source,
    model,
    qnn_compile,
    quantize,
    report,
    text,
    verify_htp,
    verify_llamacpp,
)
