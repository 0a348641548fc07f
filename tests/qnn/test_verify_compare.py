"""qnn.verify's logit comparison: a near-tie the HTP's fixed-point arithmetic flips is forgiven in
the gate's figure, a real disagreement is not (figures from the 135M build, 2026-12-02: the six
flipped positions of 35 all had a CPU QDQ margin of 0.32 logits or less)."""
from __future__ import annotations

import pytest
import torch

from pipeline.qnn.verify import compare_logits


def test_a_flipped_near_tie_is_forgiven_and_a_clear_miss_is_not():
    reference = torch.tensor([[5.0, 4.9, 0.0], [5.0, 1.0, 0.0], [2.0, 0.0, 1.7], [0.0, 3.0, 0.0]])
    simulator = torch.tensor([[4.9, 5.0, 0.0],    # picks token 1: 0.1 below the reference's top → a near-tie
                              [1.0, 5.0, 0.0],    # picks token 1: 4.0 below → a real miss
                              [2.0, 0.0, 1.0],    # agrees
                              [0.0, 3.0, 0.0]])   # agrees
    got = compare_logits(simulator, reference, tie_margin=0.5)
    assert got["top1_agreement"] == pytest.approx(0.5)
    assert got["top1_outside_ties"] == pytest.approx(0.75)
    assert compare_logits(simulator, reference, tie_margin=0.0)["top1_outside_ties"] == pytest.approx(0.5)
    assert compare_logits(simulator, reference, tie_margin=5.0)["top1_outside_ties"] == pytest.approx(1.0)
    assert got["cosine_min"] < got["cosine_mean"] < 1


def test_random_logits_fail_the_gate_however_flat():
    """A binary computing something else is not rescued by the margin (vocabulary of 49152, as SmolLM2)."""
    g = torch.Generator().manual_seed(0)
    reference, other = torch.randn(35, 49152, generator=g) * 3, torch.randn(35, 49152, generator=g) * 3
    assert compare_logits(other, reference, tie_margin=0.5)["top1_outside_ties"] < 0.1
