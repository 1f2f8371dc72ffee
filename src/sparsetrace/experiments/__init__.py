"""The paper's experiments beyond tracing one run (Wild & Anderson, sections 4.1.1, 4.4 and 5).

- masking (4.1.1): dead vs random unit masks from step K on, several seeds, Welch's t-test;
- pruning (beyond the paper): the dead units physically removed, training continued;
- capacity round 2 (4.4, Table 4): retrain with each layer as wide as round 1 used;
- sensitivity sweeps (5, Table 5, Figures 3-4): LR, width, depth or any config key.

Each is resumable: see :mod:`sparsetrace.experiments.runs`. The CLI verbs are in
:mod:`sparsetrace.experiments.verbs`; docs/experiments.md describes them.
"""
