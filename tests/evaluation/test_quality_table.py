"""How quality figures read: the Markdown table and the report's summary table."""
from __future__ import annotations

from pipeline.evaluation.html import key_values
from pipeline.evaluation.quality import quality_row
from pipeline.evaluation.quality_table import quality_table


def test_quality_table_ranks_by_perplexity_against_the_float_reference():
    protocol = {"window": 512, "windows": 2}
    rows = [quality_row("float", "float", "float32 HF", "model.safetensors", 540 * 2**20,
                        {"ppl": 20.0, "ppl_err": 0.5, "kld": -4e-7, "same_top_pct": 100.0}, protocol),
            quality_row("llama.cpp", "Q2_K", "Q2_K GGUF", "m-Q2_K.gguf", 60 * 2**20,
                        {"ppl": 31.0, "ppl_err": 0.9, "kld": 0.41, "same_top_pct": 71.2}, protocol),
            quality_row("llama.cpp", "Q8_0", "Q8_0 GGUF", "m-Q8_0.gguf", 145 * 2**20,
                        {"ppl": 20.1, "ppl_err": 0.5, "kld": 0.002, "same_top_pct": 98.5}, protocol)]
    table = quality_table(rows, 20.0).splitlines()  # the float row's KLD, a rounding below zero, reads 0
    assert table[2] == "| float | float32 HF | 540.0 | 20.0000 | 0.5000 | — | 0.00000 | 100.00% |"
    assert table[3] == "| Q8_0 | Q8_0 GGUF | 145.0 | 20.1000 | 0.5000 | +0.50% | 0.00200 | 98.50% |"
    assert table[4].startswith("| Q2_K | Q2_K GGUF | 60.0 | 31.0000 | 0.9000 | +55.00% | 0.41000 |")


def test_summary_rows_head_themselves_and_are_escaped():
    html = key_values([["recipe", "r<1>"], ["context length", 2048]])
    assert "<thead>" not in html and "<th></th>" not in html
    assert html.count('<th scope="row">') == 2 and "<td>r&lt;1&gt;</td>" in html and "<td>2048</td>" in html
