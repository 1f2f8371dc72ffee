"""The up projection's sparse paths (issue 23): the int8 screen's error bound holds, so the
screen never misses an active unit and the screened MLP equals the dense one; a gated ReLU MLP
reads only the active units' rows of W_up and W_out; both are exact in a whole model's
decoding. NaN in every row a path claims not to read proves it does not read it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsetrace.model.transformer import ModelConfig, Transformer
from sparsetrace.speed import decode as dec
from sparsetrace.speed import measure as ms
from sparsetrace.speed.sparse_down import SparseDown
from sparsetrace.speed.sparse_up import SparseUp, int8_rows

TOL = 1e-5


def _layer(d: int, ff: int, active: float, gated: bool = False, seed: int = 0):
    """Random up-projection weights whose first ``ff`` rows are positive for ~``active`` of
    standard-normal inputs (a bias shift), and such inputs."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(ff * (2 if gated else 1), d, generator=gen) * d**-0.5
    bias = 0.1 * torch.randn(weight.shape[0], generator=gen)
    x = torch.randn(200, d, generator=gen)
    pre = x @ weight[:ff].t() + bias[:ff]
    bias[:ff] -= torch.quantile(pre.flatten(), 1 - active)
    return weight, bias, x


def test_int8_bound_holds_for_any_input() -> None:
    # The bound: |W_i x - s_i fl(q_i x)| <= slack_i ||x||, here against float64, for random,
    # aligned (x = a row: the largest Cauchy-Schwarz term) and heavy-tailed inputs.
    weight, _, x = _layer(96, 300, 0.2)
    weight[0, 5] = 40.0  # an outlier row: a coarse int8 scale
    q, scales, slack = int8_rows(weight)
    inputs = torch.cat([x, weight[:50], torch.randn(50, 96).pow(3)])
    exact = inputs.double() @ weight.double().t()
    estimate = (inputs.float() @ (q.float() * scales[:, None]).t()).double()
    error = (exact - estimate).abs()
    assert (error <= slack.double() * inputs.double().norm(dim=1, keepdim=True)).all()
    assert (error > 0).any()  # the quantisation is not exact: the bound is doing work
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    # Weights exactly int8 times a power of two: no quantisation error, so what remains is the
    # float32 rounding of the estimate, which the slack must cover too.
    gen = torch.Generator().manual_seed(5)
    ints = torch.randint(-127, 128, (300, 96), generator=gen).float()
    ints[:, 0] = 127
    q, scales, slack = int8_rows(ints * 2.0**-7)
    assert torch.equal(q.float() * scales[:, None], ints * 2.0**-7)  # exact
    exact = inputs.double() @ (ints.double() * 2.0**-7).t()
    error = (exact - (inputs @ (q.float() * scales[:, None]).t()).double()).abs()
    assert (error > 0).any()
    assert (error <= slack.double() * inputs.double().norm(dim=1, keepdim=True)).all()


@pytest.mark.parametrize("n", [1, 3, 20])  # 20 > max_rows: the dense fallback
def test_screen_keeps_every_active_unit_and_equals_dense(n: int) -> None:
    weight, bias, x = _layer(64, 256, 0.2)
    up = SparseUp(weight, bias, screen=True)
    for start in range(0, 200 - n, 37):
        rows = x[start : start + n]
        dense = rows @ weight.t() + bias
        got = up(rows)
        assert torch.allclose(F.relu(got), F.relu(dense), atol=TOL)
        if n <= up.max_rows:
            kept = up.candidates(rows)
            assert kept[dense > 0].all()  # the screen never misses an active unit
            assert kept.float().mean() < 0.6  # and rules out most inactive ones
    assert up.reads.fallbacks == (0 if n <= up.max_rows else len(range(0, 200 - n, 37)))


def test_screen_reads_only_candidate_rows() -> None:
    weight, bias, x = _layer(64, 256, 0.15, seed=1)
    rows = x[:2]
    kept = SparseUp(weight, bias, screen=True).candidates(rows)
    assert 0 < int(kept.any(0).sum()) < 256
    poisoned = weight.clone()
    poisoned[~kept.any(0)] = float("nan")  # the float32 rows of units ruled out
    up = SparseUp(poisoned, bias, screen=True)
    up.q.copy_(int8_rows(weight)[0])  # the int8 copy is read in full: keep it clean
    up.scales.copy_(int8_rows(weight)[1])
    up.slack.copy_(int8_rows(weight)[2])
    got = F.relu(up(rows))
    assert torch.isfinite(got).all()
    assert torch.allclose(got, F.relu(rows @ weight.t() + bias), atol=TOL)
    assert up.reads.rows == int(kept.any(0).sum())  # one read per row of the union


def test_screen_keeps_units_the_dense_product_rounds_positive() -> None:
    # The boundary: weights exactly int8 times a power of two (no quantisation error: the
    # Cauchy-Schwarz term is 0) and biases set so that the dense float32 product is a hair above
    # zero for every unit. Only the rounding slack keeps them all candidates.
    gen = torch.Generator().manual_seed(11)
    ints = torch.randint(-127, 128, (400, 256), generator=gen).float()
    ints[:, 0] = 127
    weight = ints * 2.0**-7
    x = torch.randn(1, 256, generator=gen)
    product = F.linear(x, weight)[0]
    bias = -product + product.abs() * 2.0**-20  # dense: about 1e-6 relative above zero
    dense = F.linear(x, weight, bias)[0]
    up = SparseUp(weight, bias, screen=True)
    assert float(up.slack.max()) < 1e-2 * float(weight.norm(dim=1).min())  # rounding only
    kept = up.candidates(x)[0]
    assert kept[dense > 0].all() and int((dense > 0).sum()) > 300


def test_inexact_margin_misses_active_units() -> None:
    # The must-say-no case: without the error bound (margin 0: the int8 sign alone), some
    # active units are ruled out; with it (margin 1), none; in between, fewer candidates.
    weight, bias, x = _layer(64, 256, 0.2, seed=2)
    active = (x @ weight.t() + bias) > 0
    recall, size = {}, {}
    for margin in (0.0, 0.5, 1.0):
        kept = SparseUp(weight, bias, screen=True, margin=margin).candidates(x)
        recall[margin] = float(kept[active].float().mean())
        size[margin] = float(kept.float().mean())
    assert recall[0.0] < 1.0 and recall[1.0] == 1.0
    assert size[0.0] <= size[0.5] <= size[1.0]


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize("n", [1, 4])
def test_gated_relu_reads_only_active_units(screen: bool, n: int) -> None:
    ff = 128
    weight, bias, x = _layer(48, ff, 0.2, gated=True, seed=3)
    rows = x[:n]
    gate, up_dense = (rows @ weight.t() + bias).chunk(2, dim=-1)
    expected = F.relu(gate) * up_dense
    on = (gate > 0).any(0)  # units whose W_up row some token needs
    assert 0 < int(on.sum()) < ff
    poisoned = weight.clone()
    poisoned[ff:][~on] = float("nan")  # W_up rows of units whose gate is off for every token
    up = SparseUp(poisoned, bias, gated=True, screen=screen)
    if screen:  # the screen reads the gate's int8 copy, built from the clean gate rows: same
        assert torch.equal(up.q, int8_rows(weight[:ff])[0])
    g, u = up(rows).chunk(2, dim=-1)
    got = F.relu(g) * u
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=TOL)
    assert up.reads.second_rows == int(on.sum())
    assert up.reads.rows == (int(up.candidates(rows).any(0).sum()) if screen else ff)


def test_bytes_per_token_counts_what_was_read() -> None:
    weight, bias, x = _layer(32, 64, 0.25, gated=True, seed=4)
    up = SparseUp(weight, bias, gated=True, screen=True)
    rows = x[:1]
    first = int(up.candidates(rows).sum())
    second = int(((rows @ weight[:64].t() + bias[:64]) > 0).sum())
    up(rows)
    # float32 rows of the gate's candidates and the up rows of active units; the int8 gate copy
    # with its scale, slack and bias (12 bytes a row)
    assert up.bytes_per_token == 4 * 32 * (first + second) + 64 * (32 + 12)
    assert up.dense_bytes == 128 * 32 * 4


def _model(activation: str, seed: int = 0) -> Transformer:
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=128, activation=activation,
                      style="gpt2", vocab_size=60, seq_len=48)  # fmt: skip
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sparser than at initialisation: shift the (gate) biases down
        for block in model.blocks:
            block.mlp.w_in.bias[:128] -= 0.5
    return model


@pytest.mark.parametrize("activation,up", [("relu", "screen"), ("relu2", "screen"),
                                           ("reglu", "dense"), ("reglu", "screen")])  # fmt: skip
def test_sparse_model_decodes_the_same_logits(activation: str, up: str) -> None:
    model = _model(activation)
    prompt = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(1))
    tokens, logits = dec.decode(model, prompt, 12)
    downs = dec.sparsify(model, up=up)
    ups = dec.sparse_ups(model)
    assert len(ups) == 2 and all(u.screen == (up == "screen") for u in ups)
    assert all(u.gated == (activation == "reglu") for u in ups)
    sparse_tokens, sparse_logits = dec.decode(model, prompt, 12)
    assert torch.equal(sparse_tokens, tokens)
    assert torch.allclose(sparse_logits, logits, atol=1e-4)
    assert all(u.reads.fallbacks == 0 and u.reads.tokens == 6 + 12 for u in ups)  # all sparse
    assert all(d.read_fraction < 0.6 for d in downs)
    assert all(u.candidate_fraction < 0.6 for u in ups if u.screen)  # the screen ruled out


def test_screen_needs_a_relu_family_model_of_ours() -> None:
    from sparsetrace.errors import UserError

    with pytest.raises(UserError, match="int8 screen"):
        dec.sparsify(_model("gelu"), taus=[0.1, 0.1], up="screen")
    with pytest.raises(UserError, match="up must be one of"):
        dec.sparsify(_model("relu"), up="int4")
    model = _model("relu")
    for margin, up in ((1.5, "screen"), (0.5, "dense")):  # refused before anything is swapped
        with pytest.raises(UserError, match="margin"):
            dec.sparsify(model, up=up, margin=margin)
        assert isinstance(model.blocks[0].mlp.w_out, torch.nn.Linear)


@pytest.mark.parametrize("kernel", ["embedding_bag", "numba"])  # module by module; fused
def test_path_timing_counts_the_bytes_of_each_path(kernel: str) -> None:
    model = _model("reglu", seed=2)
    ids = torch.randint(0, 60, (1, 5), generator=torch.Generator().manual_seed(3))
    inputs, active = dec.active_patterns(model, [ids])
    originals = {path: model.get_submodule(path)
                 for path in dec.mlp_paths(model) + dec.mlp_paths(model, fused=True)}  # fmt: skip
    swaps = {"gate": dec.Swap.sparse(model, None, kernel),
             "screen": dec.Swap.sparse(model, None, kernel, up="screen")}  # fmt: skip
    fused = kernel == "numba"  # the swaps hold whole sparse MLPs, or projections
    assert all(isinstance(m, dec.OurSparseMlp) == fused
               for s in swaps.values() for m in s.modules)  # fmt: skip
    rows = {t.path: t for t in ms.time_mlp_paths(model, inputs, swaps, 1e10, 1)}
    assert all(model.get_submodule(p) is m for p, m in originals.items())  # all left dense
    row = 4 * 32  # bytes of one float32 row of d_model = 32
    dense = row * (2 * 128 + 128)  # W_in (gate and up) and W_out per layer
    # counted here from the dense model: per token, the active units' rows of W_up and W_out
    units = float(torch.stack([a.float().sum(1).mean() for a in active]).mean())
    candidates = float(torch.stack([  # the screen's float32 gate rows, from a fresh SparseUp
        SparseUp.from_module(block.mlp.w_in, gated=True, screen=True).candidates(x).float()
        .sum(1).mean() for block, x in zip(model.blocks, inputs, strict=True)]).mean())  # fmt: skip
    expected = {
        "gate": row * (128 + 2 * units),
        "screen": 128 * (32 + 12) + row * (candidates + 2 * units),
    }
    for name, read in expected.items():
        t = rows[name]
        assert t.dense_bytes == dense
        assert t.sparse_bytes == pytest.approx(read, rel=1e-6)
        assert t.bound_speedup == pytest.approx(dense / read, rel=1e-6)
    assert rows["gate"].candidates == 1.0 and rows["screen"].candidates < 1.0
    assert rows["gate"].active == pytest.approx(units / 128)


@pytest.mark.parametrize("kernel", ["numba", "embedding_bag"])  # fused; module by module
def test_llama_relu_gate_skips_up_rows(kernel: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    from sparsetrace.speed.sparse_up import SparseMlp

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, hidden_act="relu",
                      max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(6)
    model = LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(0, 64, (1, 5))
    tokens, logits = dec.decode(model, prompt, 6)
    downs = dec.sparsify(model, kernel=kernel)
    assert isinstance(model.model.layers[0].mlp, SparseMlp)
    assert model.model.layers[0].mlp.fused == (kernel == "numba")
    assert len(dec.sparse_ups(model)) == 2 and len(downs) == 2
    sparse_tokens, sparse_logits = dec.decode(model, prompt, 6)
    assert torch.equal(sparse_tokens, tokens)
    assert torch.allclose(sparse_logits, logits, atol=1e-4)
    # One MLP, the up rows of the units its ReLU gate shuts poisoned: the dense MLP reads them
    mlp, x = LlamaMLP(cfg).eval(), torch.randn(1, 32)
    with torch.no_grad():
        off = mlp.gate_proj(x)[0] <= 0
        expected = mlp(x)
        mlp.up_proj.weight[off] = float("nan")
        assert not torch.isfinite(mlp(x)).all()
        got = SparseMlp.llama(mlp, SparseDown.from_module(mlp.down_proj, kernel=kernel))(x)
    assert torch.isfinite(got).all() and torch.allclose(got, expected, atol=TOL)


@pytest.mark.parametrize("threads", [1, 3, 64])  # chunks of the units; 64 > ff: empty chunks
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("used", [0, 1, 2, 3, 5, 7, 8, 9, 17])  # union sizes: remainders of 8
def test_mlp_rows_reads_the_used_rows_only(n: int, used: int, threads: int) -> None:
    # The gated kernel with its down projection: the up rows of units whose gate is off for
    # every token, and the W_out rows of units no token activates, are NaN and never read.
    import numpy as np

    from sparsetrace.speed.kernels import mlp_rows

    gen = np.random.default_rng(used)
    d, ff, d_out = 24, 40, 16
    x = gen.standard_normal((n, d)).astype(np.float32)
    gate_w = gen.standard_normal((ff, d)).astype(np.float32)
    up_w = gen.standard_normal((ff, d)).astype(np.float32)
    up_b = gen.standard_normal(ff).astype(np.float32)
    table = gen.standard_normal((ff, d_out)).astype(np.float32)  # W_out^T
    out_b = gen.standard_normal(d_out).astype(np.float32)
    units = gen.choice(ff, used, replace=False)
    gate_b = np.full(ff, -1e3, np.float32)  # off for every token
    gate_b[units] = 0.5 - gate_w[units] @ x[0]  # token 0: 0.5 (on); others: either sign
    pre = x.astype(np.float64) @ gate_w.T + gate_b
    on = pre > 0
    assert int(on.any(0).sum()) == used
    poisoned_up, poisoned_table = up_w.copy(), table.copy()
    poisoned_up[~on.any(0)] = np.nan
    poisoned_table[~on.any(0)] = np.nan
    first, second, h = (np.full((n, ff), -7.0, np.float32) for _ in range(3))
    out = np.full((n, d_out), -7.0, np.float32)
    reads = mlp_rows(x, gate_w, gate_b, poisoned_up, up_b, np.empty((0, 0), np.int8),
                     np.empty(0, np.float32), np.empty(0, np.float32), np.float32(1.0),
                     poisoned_table, out_b, False, threads, first, second, h, out)  # fmt: skip
    values = np.where(on, x.astype(np.float64) @ up_w.T + up_b, 0.0)
    hidden = np.maximum(pre, 0) * values
    np.testing.assert_allclose(first, pre, rtol=1e-5, atol=1e-3)  # every gate row computed
    np.testing.assert_allclose(second, values, rtol=1e-5, atol=1e-5)  # 0 where not read
    np.testing.assert_allclose(h, hidden, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out, hidden @ table + out_b, rtol=1e-5, atol=1e-4)
    assert reads == (ff, used, int(on.sum()))


@pytest.mark.parametrize("threads", [1, 3, 64])  # chunks of the units; 64 > d_ff: empty chunks
@pytest.mark.parametrize("tau", [-1.0, 0.4])  # nonzero units; the CETT rule
def test_sparse_rows_matvec_sums_the_read_rows_only(threads: int, tau: float) -> None:
    import numpy as np

    from sparsetrace.speed.kernels import sparse_rows_matvec

    gen = np.random.default_rng(threads)
    weight_t = gen.standard_normal((30, 12)).astype(np.float32)
    norms = (0.5 + gen.random(30)).astype(np.float32)
    h = np.maximum(gen.standard_normal((3, 30)), 0).astype(np.float32)
    h[1] = 0.0  # a token with no unit read
    h[2, :29] = 0.0  # one unit: a single group, seven padded lanes
    read = (h != 0) if tau < 0 else (np.abs(h) * norms >= np.float32(tau)) & (h != 0)
    poisoned = weight_t.copy()
    poisoned[~read.any(0)] = np.nan  # rows no token reads are never touched
    out = np.full((3, 12), -7.0, np.float32)
    assert sparse_rows_matvec(h, poisoned, norms, np.float32(tau), out, threads) == read.sum()
    expected = (h * read).astype(np.float64) @ weight_t
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 20])  # 20 > max_rows: torch's product
def test_dense_gemv_equals_linear(n: int) -> None:
    from transformers.pytorch_utils import Conv1D

    from sparsetrace.speed.dense_gemv import DenseGemv

    torch.manual_seed(9)
    linear, conv = torch.nn.Linear(48, 40), Conv1D(40, 48)  # Conv1D stores (in, out)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(n, 2, 48)[:, 0]  # not contiguous
    with torch.no_grad():
        for module in (linear, conv):
            assert torch.allclose(DenseGemv.from_module(module)(x), module(x), atol=TOL)


@pytest.mark.parametrize("kernel", ["embedding_bag", "numba"])  # module by module; fused
def test_decode_rows_count_decoding_steps_not_the_prefill(kernel: str) -> None:
    from sparsetrace.speed.run import Variant, _decode_rows

    model = _model("relu", seed=4)
    prompt = torch.randint(0, 60, (1, 16), generator=torch.Generator().manual_seed(5))
    on = []  # independent count: the active units of one-token calls (decoding steps)
    hooks = [b.mlp.w_out.register_forward_pre_hook(
        lambda _m, a: on.append(float((a[0] != 0).float().mean())) if a[0].shape[1] == 1 else None)
        for b in model.blocks]  # fmt: skip
    with torch.no_grad():
        dec.decode(model, prompt, 6)
    for h in hooks:
        h.remove()
    steps = sum(on) / len(on)
    variants = [Variant.of("m", model, None, kernel),
                Variant.of("m, screen", model, None, kernel, "screen")]  # fmt: skip
    rows = _decode_rows(variants, prompt, 6, 1, 1e10)
    assert [r["active fraction (decode)"] for r in rows] == pytest.approx([steps] * 2)
    read = rows[0]["MB per token (sparse)"] * 1e6
    dense = rows[0]["MB per token (dense)"] * 1e6
    assert dense - read == pytest.approx((1 - steps) * 2 * 4 * 32 * 128)  # W_out rows skipped
    assert isinstance(model.blocks[0].mlp.w_out, torch.nn.Linear)  # left dense


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("activation,screen", [("relu", False), ("relu", True), ("relu2", True),
                                               ("reglu", False), ("reglu", True)])  # fmt: skip
def test_fused_mlp_reads_only_what_its_path_needs(activation: str, screen: bool, n: int) -> None:
    # One kernel call for the whole MLP: every float32 row its path claims not to read is NaN
    # (the screen's non-candidates in W_in or the gate, W_up rows of units whose gate is off,
    # W_out rows of units no token activates) and the output equals the dense MLP's.
    from sparsetrace.speed.sparse_up import SparseMlp

    ff, d, gated = 96, 40, activation == "reglu"
    weight, bias, x = _layer(d, ff, 0.2, gated=gated, seed=7)
    w_out = torch.randn(d, ff, generator=torch.Generator().manual_seed(8)) * ff**-0.5
    b_out = torch.randn(d, generator=torch.Generator().manual_seed(9))
    rows = x[:n]
    pre = rows @ weight.t() + bias
    if gated:
        gate, value = pre.chunk(2, dim=-1)
        hidden = F.relu(gate) * value
    else:
        gate = pre
        hidden = F.relu(pre).square() if activation == "relu2" else F.relu(pre)
    expected = hidden @ w_out.t() + b_out
    first_read = SparseUp(weight, bias, gated=gated, screen=True).candidates(rows).any(0)
    if not screen:
        first_read[:] = True
    active = (hidden != 0).any(0)
    assert 0 < int(active.sum()) < ff and (not screen or int(first_read.sum()) < ff)
    poisoned, poisoned_out = weight.clone(), w_out.clone()
    poisoned[:ff][~first_read] = float("nan")
    if gated:
        poisoned[ff:][~(gate > 0).any(0)] = float("nan")
    poisoned_out[:, ~active] = float("nan")
    up = SparseUp(poisoned, bias, gated=gated, screen=screen)
    if screen:  # the int8 copy is read in full: built from the clean rows
        for name, value in zip(("q", "scales", "slack"), int8_rows(weight[:ff]), strict=True):
            getattr(up, name).copy_(value)
    down = SparseDown(poisoned_out, b_out)
    mlp = SparseMlp(up, down, square=activation == "relu2")
    fused = []  # one kernel call for the whole MLP: compute() given the down projection
    compute = up.compute
    up.compute = lambda x, d=None, *a: fused.append(d is down) or compute(x, d, *a)
    h, got = mlp.hidden_and_output(rows)
    assert fused == [True]
    assert torch.isfinite(got).all() and torch.allclose(got, expected, atol=TOL)
    assert torch.allclose(h, hidden, atol=TOL)
    assert up.reads.fallbacks == 0 and up.reads.calls == 1 and down.reads.tokens == n
    assert up.reads.rows == int(first_read.sum())
    assert down.reads.rows == int((hidden != 0).sum())
    assert up.reads.second_rows == (int((gate > 0).any(0).sum()) if gated else 0)


@pytest.mark.parametrize("activation", ["relu", "reglu"])
def test_fused_mlp_counts_and_falls_back_as_the_dense_mlp(activation: str) -> None:
    # In our model's slot: `measure` counts each unit's nonzero activations as MLP.forward
    # does; more than max_rows tokens take the modules one after the other (dense products).
    model = _model(activation, seed=4)
    mlp = model.blocks[0].mlp
    x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, counts = mlp(x, True)
        dec.sparsify(model)
        fused = model.blocks[0].mlp
        assert isinstance(fused, dec.OurSparseMlp)
        got, got_counts = fused(x, True)  # 40 tokens: the fallback
        assert fused.up.reads.fallbacks == 1 and fused.down.reads.fallbacks == 1
        small, small_counts = fused(x[:, :3], True)  # 6 tokens: the fused kernel
        assert fused.up.reads.fallbacks == 1 and fused.up.reads.calls == 1
        assert fused(x[:, :3], False)[1] is None
    assert torch.allclose(got, expected, atol=TOL) and torch.equal(got_counts, counts)
    assert torch.allclose(small, mlp(x[:, :3], False)[0], atol=TOL)
    assert torch.equal(small_counts, mlp(x[:, :3], True)[1])


@pytest.mark.parametrize("up", ["dense", "screen"])
@pytest.mark.parametrize("activation", ["relu", "reglu"])
def test_fused_path_keeps_a_unit_mask(activation: str, up: str) -> None:
    # The masking experiment's 0/1 unit mask, applied by MLP.forward between the projections:
    # the fused path folds it into the (gate) bias (-inf: never active) and decodes the same,
    # past max_rows too (a 20-token prefill: the dense products), and never reads the masked
    # units' W_out rows (NaN in a second model, decoding from a prompt within max_rows).
    mask = (torch.arange(128) % 3 != 0).float()

    def masked() -> Transformer:
        model = _model(activation, seed=6)
        for block in model.blocks:
            block.mlp.set_unit_mask(mask)
        return model

    prompt = torch.randint(0, 60, (1, 20), generator=torch.Generator().manual_seed(2))
    tokens, logits = dec.decode(masked(), prompt, 8)
    _, unmasked = dec.decode(_model(activation, seed=6), prompt, 8)
    assert not torch.allclose(unmasked, logits, atol=1e-3)  # the mask matters here
    model = masked()
    dec.sparsify(model, up=up)
    sparse_tokens, sparse_logits = dec.decode(model, prompt, 8)
    assert model.blocks[0].mlp.up.reads.fallbacks == 1  # the prompt took the dense products
    assert torch.equal(sparse_tokens, tokens)
    assert torch.allclose(sparse_logits, logits, atol=1e-4)
    short = prompt[:, :5]
    _, expected = dec.decode(masked(), short, 8)
    poisoned = masked()
    with torch.no_grad():
        for block in poisoned.blocks:
            block.mlp.w_out.weight[:, mask == 0] = float("nan")
    dec.sparsify(poisoned, up=up)
    _, got = dec.decode(poisoned, short, 8)
    assert torch.isfinite(got).all() and torch.allclose(got, expected, atol=1e-4)


def test_a_mask_the_fused_path_cannot_take_is_refused_before_anything_is_swapped() -> None:
    from sparsetrace.errors import UserError

    model = _model("relu")
    model.blocks[1].mlp.set_unit_mask(torch.full((128,), 0.5))  # the second layer's
    with pytest.raises(UserError, match="0/1 unit masks"):
        dec.sparsify(model)
    assert all(isinstance(block.mlp, type(model.blocks[1].mlp)) for block in model.blocks)
    assert not any(isinstance(block.mlp, dec.OurSparseMlp) for block in model.blocks)


def test_sparse_mlp_refuses_parts_that_do_not_make_one_mlp() -> None:
    from sparsetrace.speed.sparse_up import SparseMlp

    weight, bias, _ = _layer(32, 64, 0.2, gated=True)
    with pytest.raises(ValueError, match="square"):
        SparseMlp(SparseUp(weight, bias, gated=True), SparseDown(torch.randn(32, 64)), True)
    with pytest.raises(ValueError, match="one MLP"):
        SparseMlp(SparseUp(weight, bias, gated=True), SparseDown(torch.randn(32, 48)))
    up, bags = (
        SparseUp(weight[:64], bias[:64]),
        SparseDown(torch.randn(32, 64), kernel="embedding_bag"),
    )
    with pytest.raises(ValueError, match="fused MLP"):
        up.compute(torch.randn(1, 32).numpy(), bags)


def test_nested_swaps_stay_independent() -> None:
    # The decoding benchmark runs a whole-MLP swap (fused) over a swap of every linear layer
    # (the numba GEMV beneath): switching either, in any order, never writes into a module the
    # other put in place, and both switched off leave the model as it was.
    model = _model("relu", seed=3)
    blocks = [(b.mlp, b.mlp.w_in, b.mlp.w_out, b.attn.qkv) for b in model.blocks]
    prompt = torch.randint(0, 60, (1, 5), generator=torch.Generator().manual_seed(4))
    _, logits = dec.decode(model, prompt, 4)
    fused = dec.Swap.sparse(model, None, "numba")
    beneath = dec.Swap.gemv(model, everywhere=True)
    for order in ((beneath, fused), (fused, beneath)):
        for swap in order:
            swap.use(sparse=True)
        assert isinstance(model.blocks[0].mlp, dec.OurSparseMlp)
        assert torch.allclose(dec.decode(model, prompt, 4)[1], logits, atol=1e-4)
        for swap in order:
            swap.use(sparse=False)
        assert not hasattr(fused.modules[0], "w_in")  # nothing written into the fused MLP
        assert [(b.mlp, b.mlp.w_in, b.mlp.w_out, b.attn.qkv) for b in model.blocks] == blocks


def test_recall_counts_the_dense_models_active_units_the_screen_keeps() -> None:
    from sparsetrace.speed.run import _recall

    model = _model("relu", seed=8)
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(9))
    inputs, active = dec.active_patterns(model, [ids])
    assert math.isnan(_recall(dec.Swap.sparse(model, None, "numba"), inputs, active))  # no screen
    for margin in (1.0, 0.0):
        swap = dec.Swap.sparse(model, None, "numba", up="screen", margin=margin)
        kept = [SparseUp.from_module(b.mlp.w_in, screen=True, margin=margin).candidates(x)
                for b, x in zip(model.blocks, inputs, strict=True)]  # fmt: skip
        hit = sum(int((k & a).sum()) for k, a in zip(kept, active, strict=True))
        expected = hit / sum(int(a.sum()) for a in active)
        assert _recall(swap, inputs, active) == pytest.approx(expected)
        assert (expected == 1.0) == (margin == 1.0)  # margin 0 misses some here; 1 none
