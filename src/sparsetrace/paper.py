"""The paper's published numbers (Wild & Anderson, Tables 1-3 and the text), copied verbatim.

Every report table shows these beside the run's values. Percentages are as printed (Table 2's
".05" is 0.05 %). The paper's model: 6 layers, d_ff 32768, ReLU, C4, device batch 16 x 512 tokens,
AdamW, 5000 warm-up steps to a peak LR of 3e-3 then cosine decay, 1M steps.
"""

from __future__ import annotations

import pandas as pd

LABEL = "paper: 6-layer, d_ff 32768, C4"
N_LAYERS = 6
WARMUP_STEPS = 5000
TOTAL_STEPS = 1_000_000
SETUP = (
    "6-layer decoder-only ReLU Transformer, d_ff 32768, C4 next-token prediction, "
    "device batch 16 x 512 = 8192 tokens, AdamW, 5000 warm-up steps to peak LR 3e-3, "
    "cosine decay, 1M steps"
)

# Section 3, result 1: "a moderate (-0.15) negative correlation between token and batch hidden unit
# use". Pearson r of Table 1's printed per-token and per-batch columns is -0.054; we show both.
TOKEN_BATCH_CORRELATION = -0.15
# Section 1: "about 5% of the total hidden dimension of a layer ... never turn on". No per-layer
# values are published; Table 2's arithmetic gives them: 100 - on at batch 0 - turned on.
NEVER_USED_PCT = 5.0

# Table 1: per-token, per-sequence, per-batch use (%), Token/Seq and Seq/Batch dimension ratios.
TABLE1 = {
    0: (4.1, 12.2, 13.3, 0.346, 0.917),
    1: (6.8, 71.7, 79.3, 0.096, 0.904),
    2: (7.1, 58.8, 71.0, 0.121, 0.828),
    3: (6.4, 54.2, 73.0, 0.118, 0.742),
    4: (2.6, 50.7, 86.1, 0.051, 0.589),
    5: (3.0, 58.0, 95.6, 0.052, 0.606),
}
# Table 2: on at batch 0, turned on, turned off, final use (%).
TABLE2 = {
    0: (97.0, 0.05, 83.8, 13.2),
    1: (93.2, 1.7, 15.6, 79.3),
    2: (90.9, 2.6, 22.5, 71.0),
    3: (89.0, 4.3, 20.2, 73.1),
    4: (88.2, 8.5, 10.6, 86.1),
    5: (87.5, 12.2, 3.8, 95.6),
}
# Table 3: rescaled 50th/65th/75th/90th percentile use, % of the sequence's tokens.
TABLE3_PERCENTILES = (50.0, 65.0, 75.0, 90.0)
TABLE3 = {
    0: (13.5, 31.3, 59.2, 94.6),
    1: (1.7, 2.9, 4.6, 40.0),
    2: (1.6, 3.2, 5.9, 51.1),
    3: (1.2, 2.3, 4.0, 35.2),
    4: (0.5, 0.8, 1.2, 3.7),
    5: (0.6, 1.1, 1.8, 6.9),
}

# Findings about the course of training, as the paper states them (no numbers are published).
TRAINING_FINDINGS = {
    "per_token_drop_order": "drops first in the final layer, then the penultimate, then the "
    "lower layers in nearly-monotonic succession (Fig. 2a)",
    "p50_drop_order": "same order as per-token use (Fig. 2b)",
    "deaths_after_warmup": "very few units turn off in the first 8000 steps (warm-up 5000), then "
    "a dramatic increase (section 4.2)",
}


def layer_table() -> pd.DataFrame:
    """The paper's per-layer values in the report's layer-table layout (percent; ratios as is)."""
    rows = {}
    for layer in range(N_LAYERS):
        tok, seq, batch, tok_seq, seq_batch = TABLE1[layer]
        first, on, off, final = TABLE2[layer]
        rows[layer] = {
            "per_token": tok, "per_sequence": seq, "per_batch": batch,
            "token_seq_ratio": tok_seq, "seq_batch_ratio": seq_batch,
            "on_first_batch": first, "turned_on": on, "turned_off": off, "final_use": final,
            "never_used": 100.0 - first - on,
        }  # fmt: skip
        rows[layer].update(
            {f"p{p:g}": v for p, v in zip(TABLE3_PERCENTILES, TABLE3[layer], strict=True)}
        )
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "layer"
    return frame


# The experiments' published numbers (sections 4.1.1, 4.4, 5.1).
# Section 4.1.1: "about 30% (calculated in aggregate over all layers)" masked at step 50k of 1M.
PAPER_MASKED_PCT = 30.0
PAPER_MASK_STEP = 50_000
# Table 4, verbatim: layer -> (units used round 1, round 2, % used round 1, % used round 2).
# Round 1 had 32768 units per layer; round 2 each layer's round-1 count.
TABLE4 = {
    0: (7455, 1364, 22.7, 18.2),
    1: (24807, 18529, 75.7, 74.6),
    2: (22743, 16079, 69.4, 70.6),
    3: (24478, 19455, 74.7, 79.4),
    4: (27926, 24171, 85.2, 86.5),
    5: (32200, 31730, 98.2, 98.5),
}
# Table 5, verbatim: peak LR -> per-batch use (%) of layers 0-5 and the printed total.
TABLE5 = {
    3e-3: ([13.3, 79.3, 71.0, 73.0, 86.1, 95.6], 69.7),
    2e-3: ([24.8, 83.2, 63.5, 71.7, 92.1, 98.0], 72.2),
    1e-3: ([37.4, 93.4, 55.8, 78.4, 99.1, 99.0], 77.2),
    5e-3: ([19.9, 75.6, 76.4, 79.6, 80.0, 88.1], 69.9),
}
