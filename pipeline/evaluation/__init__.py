"""Evaluation shared by every backend: one perplexity protocol (token ids, windows, scoring rule
and the float reference's log-probabilities in llama.cpp's KL-divergence file), task accuracy
under token budgets, and the HTML report. Helpers only: the stages that use them live in
pipeline/generic/ and in each backend's package."""

# The target runtimes whose recipes are evaluated (reference, <backend>.perplexity, report).
EVALUATED_RUNTIMES = ("genie", "llama.cpp", "mnn", "kuiper")
