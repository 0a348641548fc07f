"""Post-training weight quantization algorithms (docs/qualcomm.md): RTN, MSE range search,
SeqMSE and GPTQ over symmetric/asymmetric per-tensor, per-channel and per-block grids."""
