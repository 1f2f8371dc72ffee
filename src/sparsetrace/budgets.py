"""Measurement budgets stated once: the evaluation tokens of each Sparsing Law measurement.

Kept free of heavy imports: the command line reads these defaults before it loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SparsingTokens:
    """Evaluation tokens of the Sparsing Law measurements, per purpose: every verb's default.

    The SE of the activation ratio falls as 1/sqrt(tokens); the time of a measurement grows with
    them (results/sparsing-law-token-spread-cpu.md).
    """

    law: int = 32768  # sparsing-law: SE 0.7 % with the search, on the cpu model
    baselines: int = 16384  # sparsing-baselines: three searches and their bootstraps
    experiments: int = 16384  # experiment activations / width-depth: every checkpoint of each arm
    run: int = 4096  # the report section of `sparsetrace run` (its time budget)
    training: int = 8192  # trace.sparsing_tokens: a measurement during training


SPARSING_TOKENS = SparsingTokens()
