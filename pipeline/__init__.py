"""Kiln: recipes → content-addressed stage graph → store → bundles.

Modules here import no heavy library (torch, transformers, onnx): stage
modules import those inside their `run`, so planning and no-op builds stay fast.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
