"""Post-training weight quantization algorithms (seed 004): RTN, MSE range search,
SeqMSE and GPTQ over symmetric/asymmetric per-tensor, per-channel and per-block grids."""
