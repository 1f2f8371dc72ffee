"""Sparse MLP inference (issue 15): the sparse path computes what the dense one does (ReLU: the
same active units, logits equal to float tolerance, the same greedy tokens; CETT thresholds: the
perplexity the PPL-p% search predicted), KV-cache decoding equals the full forward pass, and the
speed verb's arithmetic and errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsetrace.checkpoint import load_trained_model
from sparsetrace.config import load_config
from sparsetrace.data import prepare_data
from sparsetrace.errors import UserError
from sparsetrace.model.transformer import KVCache, ModelConfig, Transformer
from sparsetrace.sites import activation_of
from sparsetrace.sparsing.cett import kept, unit_norms
from sparsetrace.sparsing.search import Subject, ppl_sparsity
from sparsetrace.sparsing.source import validation_batches
from sparsetrace.speed import decode as dec
from sparsetrace.speed import measure as ms
from sparsetrace.speed.sparse_down import KERNELS, SparseDown
from sparsetrace.train.loop import train

TOL = 1e-5


def _relu_rows(n: int, d_ff: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.relu(torch.randn(n, d_ff, generator=gen) - 1.0)  # ~16 % active
    if n > 1:
        rows[1] = 0.0  # a token with no active unit
    return rows


def test_sparse_modules_read_the_weights_they_hold_after_a_load_or_a_move() -> None:
    """The kernels read numpy views made at first use: weights loaded with ``assign=True`` (new
    tensors) or written into the new storage of a moved module must be what the next call
    reads."""
    from sparsetrace.speed.dense_gemv import DenseGemv
    from sparsetrace.speed.sparse_up import SparseUp

    torch.manual_seed(0)
    first, second = nn.Linear(96, 40), nn.Linear(96, 40)
    x = _relu_rows(2, 96)
    makers = {  # each module and what it computes from an nn.Linear
        "down": (lambda m: SparseDown.from_module(m, kernel="numba"), lambda m, x: m(x)),
        "dense": (DenseGemv.from_module, lambda m, x: m(x)),
        "screen": (lambda m: SparseUp(m.weight, m.bias, screen=True),
                   lambda m, x: torch.relu(m(x))),
    }  # fmt: skip
    for name, (make, apply) in makers.items():
        module = make(first)
        module(x)  # views of the first weights
        module.load_state_dict(make(second).state_dict(), assign=True)
        expected = apply(second, x).detach()
        assert torch.allclose(apply(module, x), expected, atol=TOL, rtol=TOL), name
        module = module.double().float()  # new storage: views of the old one would be stale
        with torch.no_grad():  # the first weights again, written into the new storage
            for mine, theirs in zip(module.buffers(), make(first).buffers(), strict=True):
                mine.copy_(theirs)
        expected = apply(first, x).detach()
        assert torch.allclose(apply(module, x), expected, atol=TOL, rtol=TOL), name


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [1, 3, 20])  # 20 > MAX_ROWS: the dense fallback
def test_sparse_down_equals_linear(kernel: str, n: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    down = SparseDown.from_module(linear, kernel=kernel)
    rows = _relu_rows(n, 96)
    with torch.no_grad():
        expected = linear(rows)
        if n > down.max_rows:
            with pytest.warns(UserWarning, match="dense product"):
                got = down(rows.view(n, 1, 96)).view(n, 40)
        else:
            got = down(rows.view(n, 1, 96)).view(n, 40)
    assert torch.allclose(got, expected, atol=TOL, rtol=TOL)
    assert down.reads.fallbacks == (1 if n > down.max_rows else 0)
    assert torch.equal(down.dense_weight(), linear.weight.detach())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tau", [None, 0.5])
def test_sparse_down_reads_only_active_rows(kernel: str, tau: float | None) -> None:
    # Poison the rows of the units not read: the result must stay finite and right.
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    rows = _relu_rows(1, 64) if tau is None else torch.randn(1, 64)
    down = SparseDown(weight, tau=tau, kernel=kernel)
    read = down.active(rows)[0]
    assert 0 < int(read.sum()) < 64
    poisoned = weight.clone()
    poisoned[:, ~read] = float("nan")
    got = SparseDown(poisoned, tau=tau, kernel=kernel)(rows)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, (rows * read) @ weight.t(), atol=TOL)
    assert down(rows) is not None and down.read_fraction == pytest.approx(
        float(read.float().mean())
    )


@pytest.mark.parametrize("blocks", [1, 3, 7])
def test_embedding_bag_column_blocks(blocks: int) -> None:
    # 40 output features do not divide into 3 or 7 blocks: the padding is exercised too.
    torch.manual_seed(7)
    linear = nn.Linear(96, 40)
    down = SparseDown.from_module(linear, kernel="embedding_bag", blocks=blocks)
    rows = _relu_rows(5, 96)
    with torch.no_grad():
        assert torch.allclose(down(rows), linear(rows), atol=TOL)
    assert down.blocks == blocks and down.reads.rows == int((rows != 0).sum())


@pytest.mark.parametrize("kernel", KERNELS)
def test_threshold_rule_is_the_cett_rule(kernel: str) -> None:
    torch.manual_seed(2)
    linear = nn.Linear(64, 24, bias=False)
    rows = torch.randn(4, 64)  # a non-ReLU activation: every entry nonzero
    n = unit_norms(rows, linear.weight)
    tau = float(n.detach().median())  # half the units kept
    with torch.no_grad():
        expected = linear(rows * kept(n, tau))
        got = SparseDown.from_module(linear, tau=tau, kernel=kernel)(rows)
    assert torch.allclose(got, expected, atol=TOL)
    assert not torch.allclose(got, linear(rows).detach(), atol=1e-3)  # truncation did something


def test_gpt2_conv1d_layout() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    conv = Conv1D(24, 64)  # nf=24 outputs, nx=64 inputs; weight (64, 24)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    rows = _relu_rows(2, 64)
    with torch.no_grad():
        assert torch.allclose(SparseDown.from_module(conv)(rows), conv(rows), atol=TOL)


@pytest.mark.parametrize("pos,style", [("learned", "gpt2"), ("relative", "t5"), ("rope", "t5"),
                                       ("sinusoidal", "t5"), ("none", "gpt2")])  # fmt: skip
def test_kv_cache_decoding_equals_full_forward(pos: str, style: str) -> None:
    torch.manual_seed(4)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, style=style, pos=pos,
                      vocab_size=50, seq_len=32)  # fmt: skip
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, 50, (1, 5))
    tokens, logits = dec.decode(model, prompt, 8)
    with torch.no_grad():
        full = model(torch.cat([prompt, tokens], 1)).logits[:, 4:12]
        # a two-token chunk after a cached prefix: the causal offset of the mask
        cache = KVCache(2)
        model(prompt, cache=cache)
        chunk = model(tokens[:, :2], cache=cache).logits
    assert torch.allclose(logits, full, atol=TOL)
    assert torch.allclose(chunk, full[:, 1:3], atol=TOL)
    assert cache.length == 7


def test_learned_positions_refuse_overflow() -> None:
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, vocab_size=10, seq_len=4)
    model = Transformer(cfg).eval()
    cache = KVCache(1)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Tiny trained runs: ReLU (the preset), SiLU and ReGLU, 20 steps."""
    base = tmp_path_factory.mktemp("speed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSETRACE_CACHE", str(base / "cache"))
        out = {}
        for act in ("relu", "silu", "reglu"):
            args = ["--out_dir", str(base), "--run_name", act, "--model.activation", act]
            out[act] = train(load_config("tiny", [*args, "--train.threads", "1"]))
        yield out


def test_sparse_relu_model_decodes_the_same_logits(runs: dict[str, Path]) -> None:
    model, cfg = load_trained_model(runs["relu"])
    val = torch.as_tensor(prepare_data(cfg.data).val[:40].astype("int64"))[None]
    prompt = val[:, :8]
    tokens, logits = dec.decode(model, prompt, 16)
    with torch.no_grad():
        full = model(val[:, :32]).logits
    downs = dec.sparsify(model)
    assert len(downs) == cfg.model.n_layers and all(isinstance(d, SparseDown) for d in downs)
    sparse_tokens, sparse_logits = dec.decode(model, prompt, 16)
    assert torch.equal(sparse_tokens, tokens)
    assert torch.allclose(sparse_logits, logits, atol=1e-4)
    assert downs[0].reads.fallbacks == 0  # an 8-token prompt is within MAX_ROWS: sparse too
    with torch.no_grad():
        assert torch.allclose(model(val[:, :32]).logits, full, atol=1e-4)
    assert downs[0].reads.fallbacks == 1  # 32 tokens: the dense fallback


@pytest.mark.parametrize("kernel", KERNELS)
def test_thresholded_perplexity_is_what_ppl_p_predicted(runs: dict[str, Path], kernel: str) -> None:
    model, cfg = load_trained_model(runs["silu"])
    batches = validation_batches(prepare_data(cfg.data).val, cfg.data.seq_len, 512)
    result = ppl_sparsity(Subject(model, batches), p=5.0)
    m = result.measurement
    taus = [m.layers[name].tau for name in sorted(m.layers)]
    with torch.no_grad():
        dense = sum(float(model(b.inputs, b.targets).loss) for b in batches) / len(batches)
        dec.sparsify(model, taus, kernel, max_rows=10**9)  # every token through the kernel
        sparse = sum(float(model(b.inputs, b.targets).loss) for b in batches) / len(batches)
    # The sparse path's up projection (DenseGemv) sums in another order than torch's: a unit
    # within rounding of its threshold may fall the other way, hence 1e-4, not 1e-6.
    assert math.exp(sparse - dense) == pytest.approx(m.ppl_ratio, rel=1e-4)
    assert m.ppl_ratio > 1.01  # the thresholds truncated something


def test_non_relu_needs_thresholds(runs: dict[str, Path]) -> None:
    model, _ = load_trained_model(runs["silu"])
    with pytest.raises(UserError, match="sparsing-law"):
        dec.sparsify(model)


def test_hf_opt_sparse_decoding_equals_dense() -> None:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(5)
    cfg = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=96,
                    num_attention_heads=2, max_position_embeddings=64,
                    word_embed_proj_dim=32)  # fmt: skip
    model = OPTForCausalLM(cfg).eval()
    prompt = torch.randint(0, 64, (1, 6))
    tokens, logits = dec.decode(model, prompt, 8)
    assert activation_of(model) == "relu"
    downs = dec.sparsify(model)
    assert len(downs) == 2
    sparse_tokens, sparse_logits = dec.decode(model, prompt, 8)
    assert torch.equal(sparse_tokens, tokens)
    assert torch.allclose(sparse_logits, logits, atol=1e-4)
    assert all(d.reads.fallbacks == 0 and d.reads.tokens == 6 + 8 for d in downs)  # all sparse


def test_transplant_hits_the_measured_fractions() -> None:
    shape = dec.DecoderShape(64, 4, 4, 256, 100, 64)
    model = dec.transplant(shape, [0.2, 0.05])
    seen = []
    for block in model.blocks:
        block.mlp.w_out.register_forward_pre_hook(
            lambda _m, a: seen.append(float((a[0] != 0).float().mean()))
        )
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(9)))
    assert seen[:2] == pytest.approx([0.2, 0.2], abs=0.03)
    assert seen[2:] == pytest.approx([0.05, 0.05], abs=0.02)


def test_transplanted_patterns_keep_each_tokens_fraction() -> None:
    small = [torch.rand(10, 64) < 0.1, torch.rand(10, 64) < 0.3]
    wide = dec.transplant_patterns(small, dec.DecoderShape(32, 4, 2, 128, 10, 16))
    assert len(wide) == 4 and wide[0].shape == (10, 128)
    for layer, src in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert torch.equal(wide[layer].sum(1), 2 * small[src].sum(1))  # 128 = 2 x 64, tiled


def test_block_timing_bounds() -> None:
    layers = ms.random_layers(32, 128, 2)
    inputs = [torch.randn(4, 32) for _ in range(2)]
    t = ms.time_mlp_block(layers, inputs, ms.random_masks(4, [128, 128], 0.25), 1e10, 1)
    assert t.active == pytest.approx(0.25)
    assert t.bound_speedup == pytest.approx(2 / 1.25)  # plain MLP: read W_in + a W_out
    assert t.oracle_bound_speedup == pytest.approx(4.0)
    assert t.bound_sparse == pytest.approx((128 * 32 + 0.25 * 32 * 128) * 4 / 1e10)
    masks = ms.random_masks(5, [100, 50, 30], 0.1)
    assert [m.shape[1] for m in masks] == [100, 50, 30]
    assert [int(m[0].sum()) for m in masks] == [10, 5, 3]
    assert all(torch.equal(m.sum(1), m[0].sum().expand(5)) for m in masks)


def test_read_bandwidth_is_the_fastest_of_its_reads() -> None:
    """At least what a plain timed ``sum`` and the numba GEMV over as many bytes read (it takes
    the fastest of those and torch's GEMV; half, for timing noise), and below 10 TB/s."""
    from sparsetrace.speed.dense_gemv import DenseGemv

    nbytes = 1 << 24
    bw = ms.read_bandwidth(nbytes, repeats=3)
    buffer = torch.ones(nbytes // 4)
    gemv, vector = DenseGemv(buffer.view(-1, 4096)), torch.ones(1, 4096)
    naive = nbytes / min(ms.best_time(buffer.sum, 3), ms.best_time(lambda: gemv(vector), 3))
    assert 0.5 * naive <= bw < 1e13


def test_read_bandwidth_takes_the_fastest_of_three_reads(monkeypatch) -> None:
    # Deterministic: the timings are given; each read must read the whole buffer.
    seen = {}

    def fake(fns, repeats):
        seen.update({name: fn() for name, fn in fns.items()})
        return {"sum": 4e-3, "torch": 2e-3, "numba": 1e-3}

    monkeypatch.setattr(ms, "best_times", fake)
    nbytes = 1 << 20
    assert ms.read_bandwidth(nbytes, repeats=1) == nbytes / 1e-3
    n = nbytes // 4
    assert float(seen["sum"]) == n  # a buffer of ones
    assert torch.equal(seen["torch"], torch.full((1, n // 4096), 4096.0))
    assert torch.allclose(seen["numba"], seen["torch"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsetrace", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_speed_verb_end_to_end(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "speed"
    proc = _cli("speed", str(runs["relu"]), "--shape", "64,4,4,256,100", "--fractions",
                "0.5,0.1", "--tokens", "4", "--new-tokens", "4", "--repeats", "1",
                "--prune-dead", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "speed.json").read_text())
    shape, plain, gated = "64,4,4,256,100", "W_out rows", "W_up + W_out rows"
    # the inexact screen: the smallest margin below 1 within 1 % perplexity on these tokens
    within = [r["margin"] for r in result["screen"] if r["margin"] < 1 and r["ppl ratio"] <= 1.01]
    margin = result["inexact_margin"]
    assert margin is not None and margin == min(within)  # the tiny model's cost is ~0
    inexact = f"int8 screen at margin {margin:g}"

    def paths(rows: str) -> list[str]:
        return [rows, f"int8 screen, {rows}", f"{inexact}, {rows}"]

    assert [(r["shape"], r["pattern"], r["path"]) for r in result["block"]] == [
        *(("model", "measured", p) for p in paths(plain)),
        ("model", "random", plain), ("model", "random", plain),
        (shape, "measured", plain), (shape, "random", plain), (shape, "random", plain),
        *((f"{shape} relu", "transplanted fraction", p) for p in paths(plain)),
        *((f"{shape} reglu", "transplanted fraction", p) for p in paths(gated)),
    ]  # fmt: skip
    assert [r["active fraction"] for r in result["block"][3:5]] == pytest.approx(
        [0.5, 0.1], abs=1 / 128
    )
    models = [r["model"] for r in result["decode"]]
    assert models[:4] == ["model", "model, int8 screen", f"model, {inexact}",
                          "model, dead units pruned"]  # fmt: skip
    assert len(models) == 10 and result["bandwidth_GBps"] > 0
    exact = result["screen"][0]  # margin 1: the whole error bound
    assert exact["margin"] == 1.0 and exact["recall"] == 1.0
    assert exact["ppl ratio"] == pytest.approx(1.0, abs=1e-5)
    # The bounds and speed-ups follow from the JSON's own times, bytes and bandwidths.
    bw = 1e9 * max(result["bandwidth_GBps"], result["bandwidth_end_GBps"])
    for r in result["decode"]:
        dense, sparse = r["MB per token (dense)"], r["MB per token (sparse)"]
        assert r["bound speed-up"] == pytest.approx(dense / sparse)
        assert r["sparse of bound"] == pytest.approx(1e6 * sparse * r["sparse tok/s"] / bw)
        best = max(r["dense tok/s"], r["dense GEMV tok/s"])
        assert r["dense of bound"] == pytest.approx(1e6 * dense * best / bw)
        assert r["speed-up"] == pytest.approx(r["sparse tok/s"] / best)
    for r in result["block"]:
        best = min(r["dense (us)"], r["dense GEMV (us)"])
        assert r["speed-up"] == pytest.approx(best / r["sparse (us)"])
        assert r["sparse of bound"] / r["dense of bound"] == pytest.approx(
            r["speed-up"] / r["bound speed-up"]
        )
    for r in result["block"][3:5]:  # random units, plain MLP: 2 / (1 + a)
        assert r["bound speed-up"] == pytest.approx(2 / (1 + r["active fraction"]))
    assert sum(result["pruning"]["removed"]) > 0  # the tiny model has dead units
    assert (out / "report" / "index.html").is_file()
    assert (out / "report" / "figures" / "speedup.png").is_file()


@pytest.mark.slow
def test_speed_verb_on_a_gated_relu_run(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "speed"
    proc = _cli("speed", str(runs["reglu"]), "--shape", "64,4,4,256,100", "--fractions", "0.1",
                "--tokens", "4", "--new-tokens", "4", "--repeats", "1",
                "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "speed.json").read_text())
    own = [r for r in result["block"] if r["shape"] == "model"]
    margin = result["inexact_margin"]
    assert [r["path"] for r in own] == [
        "W_up + W_out rows",
        "int8 screen, W_up + W_out rows",
        f"int8 screen at margin {margin:g}, W_up + W_out rows",
    ]
    assert own[0]["candidate fraction"] == 1.0 > own[1]["candidate fraction"]  # gate screened
    assert own[2]["candidate fraction"] < own[1]["candidate fraction"]  # a smaller bound
    assert own[1]["recall"] == 1.0 >= own[2]["recall"] and math.isnan(own[0]["recall"])
    # a gated MLP reads the gate, then a of W_up and of W_out: 3 / (1 + 2a) in the bound
    a = own[0]["active fraction"]
    assert own[0]["bound speed-up"] == pytest.approx(3 / (1 + 2 * a), rel=1e-6)
    assert result["screen"][0]["recall"] == 1.0


def test_inexact_margin_is_the_smallest_within_the_perplexity_budget() -> None:
    from sparsetrace.speed.run import PPL_BUDGET, _inexact_margin

    def rows(*ratios: float) -> list[dict]:
        margins = (1.0, 0.5, 0.25, 0.0)
        return [{"margin": m, "ppl ratio": r} for m, r in zip(margins, ratios, strict=True)]

    assert _inexact_margin(rows(1.0, 1.0, 1.004, 1.2)) == 0.25  # margin 0 over budget
    assert _inexact_margin(rows(1.0, 1.0, 1.0, PPL_BUDGET)) == 0.0  # the budget is inclusive
    assert _inexact_margin(rows(1.0, 1.02, 1.05, 1.2)) is None  # no margin below 1 within it
    assert _inexact_margin(None) is None  # no screen (not our ReLU-family model)


@pytest.mark.parametrize("args,message", [
    (["--fractions", "0"], "fractions"),
    (["--shape", "huge"], "shape"),
    (["--kernel", "cuda"], "kernel"),
])  # fmt: skip
def test_speed_bad_input(runs: dict[str, Path], args: list[str], message: str) -> None:
    proc = _cli("speed", str(runs["relu"]), *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_speed_non_relu_without_thresholds(runs: dict[str, Path]) -> None:
    proc = _cli("speed", str(runs["silu"]))
    assert proc.returncode == 2 and "sparsing-law" in proc.stderr


def test_prune_dead_removes_exactly_the_rarely_active_units(runs: dict[str, Path]) -> None:
    from sparsetrace.speed.run import DEAD_TOKENS, _prune_dead

    model, cfg = load_trained_model(runs["relu"])
    batches = validation_batches(prepare_data(cfg.data).val, cfg.data.seq_len, DEAD_TOKENS)
    counts = {}  # independent count: tokens on which each unit is nonzero
    hooks = [
        b.mlp.w_out.register_forward_pre_hook(
            lambda _m, a, i=i: counts.__setitem__(i, counts.get(i, 0) + (a[0] != 0).flatten(0, 1)
                                                  .sum(0)))
        for i, b in enumerate(model.blocks)
    ]  # fmt: skip
    with torch.no_grad():
        for b in batches:
            model(b.inputs)
    for h in hooks:
        h.remove()
    tokens = sum(b.inputs.numel() for b in batches)
    pruned, info = _prune_dead(model, cfg, None)
    expected = [int((counts[i] < 1e-3 * tokens).sum()) for i in sorted(counts)]
    assert info["removed"] == expected
    assert [b.mlp.w_in.out_features for b in pruned.blocks] == [max(1, 128 - r) for r in expected]
    assert info["ppl_ratio"] == pytest.approx(1.0, abs=0.01)  # rarely active: little lost


def test_swap_switches_between_dense_and_sparse(runs: dict[str, Path]) -> None:
    model, cfg = load_trained_model(runs["relu"])
    ids = torch.as_tensor(prepare_data(cfg.data).val[:8].astype("int64"))[None]
    with torch.no_grad():
        dense = model(ids).logits
        swap = dec.Swap.sparse(model, None, "numba")
        assert isinstance(model.blocks[0].mlp.w_out, nn.Linear)  # starts dense
        sparse = swap.use(sparse=True)(ids).logits
        assert isinstance(model.blocks[0].mlp, dec.OurSparseMlp)  # fused: the whole MLP
        assert isinstance(model.blocks[0].mlp.down, SparseDown)
        again = swap.use(sparse=False)(ids).logits
        assert isinstance(model.blocks[0].mlp.w_out, nn.Linear)
    assert torch.allclose(sparse, dense, atol=1e-4) and torch.equal(again, dense)


def _hf_dir(root: Path, activation: str) -> Path:
    """A tiny GPT-2 (MLP activation ``activation``) with a byte-level BPE tokenizer, saved."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from sparsetrace.data.tokenizer import EOT, train_bpe

    text = " ".join(["the cat sat on the mat and the dog ran"] * 200)
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe([text], 300), eos_token=EOT)
    torch.manual_seed(6)
    eot = tok.eos_token_id
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=96, n_positions=128,
                        activation_function=activation, vocab_size=len(tok), bos_token_id=eot,
                        eos_token_id=eot)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.mark.slow
def test_speed_verb_on_a_hugging_face_model(tmp_path: Path) -> None:
    source = _hf_dir(tmp_path / "relu-gpt2", "relu")
    out = tmp_path / "speed"
    proc = _cli("speed", str(source), "--shape", "64,4,4,256,100", "--fractions", "0.1",
                "--tokens", "4", "--new-tokens", "4", "--repeats", "1",
                "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "speed.json").read_text())
    assert result["activation"] == "relu"
    assert {r["shape"] for r in result["block"]} == {  # no rows of the model's own MLPs
        "64,4,4,256,100",
        "64,4,4,256,100 relu",
        "64,4,4,256,100 reglu",
    }
    assert result["screen"] is None  # the int8 screen covers our models only
    assert result["decode"][0]["model"] == "model"
    gelu = _cli("speed", str(_hf_dir(tmp_path / "gelu-gpt2", "gelu_new")))
    assert gelu.returncode == 2 and "ReLU" in gelu.stderr
    assert len(gelu.stderr.strip().splitlines()) == 1
    nothing = _cli("speed", str(tmp_path))
    assert nothing.returncode == 2 and "neither" in nothing.stderr


@pytest.mark.parametrize("tied", [True, False])
def test_decode_bytes_count_one_row_of_untied_tables(tied: bool) -> None:
    from sparsetrace.speed.run import Variant, _bytes

    cfg = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_ff=64, style="gpt2", vocab_size=50,
                      seq_len=32, tie_embeddings=tied)  # fmt: skip
    model = Transformer(cfg).eval()
    every = sum(p.numel() for p in model.parameters()) * 4
    skipped = (32 - 1) * 16 + (0 if tied else (50 - 1) * 16)  # position table; untied tokens
    assert _bytes(model) == every - 4 * skipped
    v = Variant.of("m", model, None, "embedding_bag")
    assert v.down_bytes == [64 * 16 * 4] * 2
    with torch.no_grad():
        v.swap.use(sparse=True)(torch.randint(0, 50, (1, 4)))
    fractions = [d.read_fraction for d in v.swap.downs]
    assert v.sparse_bytes() == pytest.approx(
        v.nbytes - sum((1 - a) * 64 * 16 * 4 for a in fractions)
    )


def test_block_sweep_takes_each_layers_width() -> None:
    from sparsetrace.speed.run import _sweep

    gen = torch.Generator().manual_seed(8)
    layers = [ms.MlpLayer.of(torch.randn(w, 16, generator=gen), torch.randn(16, w, generator=gen))
              for w in (64, 24)]  # fmt: skip
    rows = _sweep(layers, [torch.randn(3, 16), torch.randn(3, 16)], [0.25], 1e10, 1, "pruned")
    assert rows[0]["active fraction"] == pytest.approx((16 / 64 + 6 / 24) / 2)


def test_thresholds_must_belong_to_the_loaded_checkpoint(runs: dict[str, Path], tmp_path) -> None:
    import shutil

    from sparsetrace.speed.run import _taus

    run = tmp_path / "silu"
    shutil.copytree(runs["silu"], run)
    summary = {"checkpoints": [{"step": 10, "layers": {"0": {"tau": 0.1}, "1": {"tau": 0.2}}}]}
    (run / "sparsing_law.json").write_text(json.dumps(summary))
    assert _taus(run, "silu", 10) == [0.1, 0.2]
    with pytest.raises(UserError, match="step 10, but the latest checkpoint is step 20"):
        _taus(run, "silu", 20)
    (run / "sparsing_law.json").write_text("{}")
    with pytest.raises(UserError, match="not a sparsing-law summary"):
        _taus(run, "silu", 20)


def test_the_speed_verb_defaults_to_the_sparse_down_default_kernel() -> None:
    import inspect

    from sparsetrace.speed.sparse_down import DEFAULT_KERNEL
    from sparsetrace.speed.verbs import speed

    assert inspect.signature(speed).parameters["kernel"].default == DEFAULT_KERNEL
