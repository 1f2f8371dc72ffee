"""Sparsing Law (Luo et al., arXiv 2411.02335): CETT, PPL-p% sparsity, baselines and laws.

Modules: :mod:`.cett` (pure metrics, thresholds for a target CETT), :mod:`.truncation` (rules
applied by hooks on down projections), :mod:`.search` (PPL-p% search), :mod:`.baselines` (Top-k,
FAT-ε), :mod:`.over_training` (a run's checkpoints), :mod:`.laws` (power-law fits),
:mod:`.figures`, :mod:`.verbs` (CLI). Nothing is imported here, so that the CLI can import
:mod:`.verbs` without torch or scipy. docs/sparsing-law.md has the definitions.
"""
