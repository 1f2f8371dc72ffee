"""What a decision rule returns, and the rule itself as the report and docs/verdicts.md state it."""

from __future__ import annotations

from dataclasses import dataclass

HOLDS = "holds"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive"
NA = "n/a"
NO_DATA = "stated in the text, no data"  # the paper column where the paper publishes no numbers
OUTCOMES = (HOLDS, FAILS, INCONCLUSIVE, NA, NO_DATA)


@dataclass(frozen=True)
class Verdict:
    """One rule applied to one run (or to the paper's tables).

    ``evidence``: the statistic, its uncertainty and the numbers behind it; ``decide``: for an
    inconclusive (or n/a) verdict, what would decide it (more seeds, more measured steps, a
    longer run).
    """

    outcome: str
    evidence: str
    decide: str = ""

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")

    @property
    def text(self) -> str:
        """The evidence and, where given, what would decide it."""
        return f"{self.evidence}; to decide: {self.decide}" if self.decide else self.evidence

    def __str__(self) -> str:
        return f"{self.outcome}: {self.text}"


@dataclass(frozen=True)
class Rule:
    """A decision rule: the paper's claim (quoted, with its section), the statistic, the
    threshold and the reason for that threshold."""

    key: str
    claim: str  # the paper's words
    source: str  # section / table
    statistic: str
    threshold: str
    reason: str

    @property
    def line(self) -> str:
        """The rule in one line, as the report prints it next to each verdict."""
        return f"{self.statistic}; {self.threshold}"

    def no_data(self, what: str = "") -> Verdict:
        """The paper column of a claim the paper states without publishing numbers."""
        return Verdict(NO_DATA, what or f"{self.source}: no published numbers to apply it to")
