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
    kuiper_export,
    kuiper_package,
    llamacpp_build,
    llamacpp_package,
    llamacpp_source,
    mnn_config,
    mnn_export,
    mnn_package,
    model,
    qnn_compile,
    quantize,
    report,
    text,
    verify_htp,
    verify_kuiper,
    verify_llamacpp,
    verify_mnn,
)
