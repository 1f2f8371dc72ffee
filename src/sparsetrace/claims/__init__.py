"""Decision rules: what sparsetrace concludes from its numbers, and why (docs/verdicts.md)."""

from sparsetrace.claims.rules import RULES
from sparsetrace.claims.verdict import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NA,
    NO_DATA,
    OUTCOMES,
    Rule,
    Verdict,
)

__all__ = [
    "FAILS", "HOLDS", "INCONCLUSIVE", "NA", "NO_DATA", "OUTCOMES", "RULES", "Rule", "Verdict",
]  # fmt: skip
