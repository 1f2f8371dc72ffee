"""The model: in-graph use counts vs independently captured activations, conventions, masking."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetrace.metrics import use_counts
from sparsetrace.model.transformer import ModelConfig, Transformer, hidden_name


def make(**kw) -> Transformer:
    base = dict(n_layers=3, d_model=32, n_heads=4, d_ff=64, vocab_size=50, seq_len=16)
    base.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**base))


def captured_hidden(model: Transformer, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of each W_out, captured with plain forward pre-hooks (independent of measure=)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        mlp.w_out.register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, args[0].detach())
        )
        for name, mlp in model.mlps().items()
    ]
    model(idx)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize(
    "activation", ["relu", "gelu", "silu", "relu2", "swiglu", "reglu", "geglu"]
)
@pytest.mark.parametrize("style", ["gpt2", "t5"])
def test_in_graph_counts_match_hooked_activations(activation: str, style: str) -> None:
    model = make(activation=activation, style=style)
    idx = torch.randint(0, 50, (3, 16))
    out = model(idx, measure=True)
    hidden = captured_hidden(model, idx)
    assert set(out.use_counts) == {hidden_name(i) for i in range(3)}
    for name, acts in hidden.items():
        assert acts.shape == (3, 16, 64)  # gated: act(gate) * up has d_ff units
        assert torch.equal(out.use_counts[name], use_counts(acts))
    assert model(idx).use_counts is None


def test_relu_counts_are_sparse_and_smooth_activations_dense() -> None:
    idx = torch.randint(0, 50, (2, 16))
    relu = make(activation="relu")(idx, measure=True).use_counts
    gelu = make(activation="gelu")(idx, measure=True).use_counts
    assert all((c < 16).any() for c in relu.values())  # ReLU zeroes some (token, unit) pairs
    assert all((c == 16).all() for c in gelu.values())  # GELU is almost never exactly 0


def test_unit_mask_silences_units_and_their_counts() -> None:
    model = make()
    mask = torch.ones(64)
    mask[::3] = 0
    model.blocks[1].mlp.set_unit_mask(mask)
    counts = model(torch.randint(0, 50, (2, 16)), measure=True).use_counts
    assert (counts[hidden_name(1)][:, ::3] == 0).all()
    assert (counts[hidden_name(0)][:, ::3] > 0).any()  # other layers untouched


def test_per_layer_widths() -> None:
    model = make(d_ff_per_layer=[8, 16, 24])
    counts = model(torch.randint(0, 50, (2, 16)), measure=True).use_counts
    assert [c.shape[-1] for c in counts.values()] == [8, 16, 24]
    with pytest.raises(ValueError, match="entries for 3 layers"):
        ModelConfig(n_layers=3, d_ff_per_layer=[8, 16])


@pytest.mark.parametrize("pos", ["learned", "rope", "relative", "none"])
def test_attention_is_causal(pos: str) -> None:
    model = make(pos=pos)
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50
    a, b = model(idx).logits, model(changed).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_styles_set_conventions() -> None:
    t5 = make(style="t5")
    assert all(m.w_in.bias is None for m in t5.mlps().values())
    assert isinstance(t5.ln_f, torch.nn.RMSNorm) and t5.rel_bias is not None and t5.pos_emb is None
    gpt2 = make(style="gpt2")
    assert all(m.w_in.bias is not None for m in gpt2.mlps().values())
    assert isinstance(gpt2.ln_f, torch.nn.LayerNorm) and gpt2.pos_emb is not None
    assert make(style="t5", bias=True).blocks[0].mlp.w_in.bias is not None  # explicit wins


def test_mlp_kernels_are_lecun_normal() -> None:
    model = make(d_model=256, d_ff=1024, n_heads=4)
    w_in, w_out = model.blocks[0].mlp.w_in.weight, model.blocks[0].mlp.w_out.weight
    assert w_in.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.03)
    assert w_out.std().item() == pytest.approx(1 / math.sqrt(1024), rel=0.03)


@pytest.mark.slow  # compiles the model: ~20 s with a cold cache, the fast tier's margin
def test_compiled_model_measures_the_same() -> None:
    model = make(n_layers=2)
    idx = torch.randint(0, 50, (2, 16))
    eager = model(idx, idx, measure=True)
    compiled = torch.compile(model)(idx, idx, measure=True)
    for name, c in eager.use_counts.items():
        assert torch.equal(c, compiled.use_counts[name])
    assert torch.allclose(eager.loss, compiled.loss, atol=1e-5)


def test_sinusoidal_positions_are_the_fixed_table() -> None:
    """pos sinusoidal adds Vaswani's table (sin in the first half, cos in the second, as Flax's
    sinusoidal_init) to the token embeddings; it is not a parameter and not saved."""
    model = make(pos="sinusoidal", n_layers=1)
    table = model.pos_table
    d, t = 32, 16
    for pos in (0, 3, 15):
        for i in (0, 5, 15):
            freq = 10000 ** (-i / (d // 2))
            assert table[pos, i].item() == pytest.approx(math.sin(pos * freq), abs=1e-6)
            assert table[pos, d // 2 + i].item() == pytest.approx(math.cos(pos * freq), abs=1e-6)
    assert "pos_table" not in model.state_dict()
    assert all("pos_table" not in n for n, _ in model.named_parameters())
    idx = torch.randint(0, 50, (2, t))
    seen = {}
    model.blocks[0].ln_attn.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    model(idx)
    assert torch.allclose(seen["x"], model.tok_emb(idx) + table[:t])


def test_initialisation_options() -> None:
    torch.manual_seed(0)
    big = dict(n_layers=1, d_model=256, n_heads=4, d_ff=1024, vocab_size=4000, seq_len=16)
    plain = Transformer(ModelConfig(**big))
    trunc = Transformer(ModelConfig(**big, mlp_init="truncated_lecun_normal", emb_init_std=1.0))
    w_plain, w_trunc = plain.blocks[0].mlp.w_in.weight, trunc.blocks[0].mlp.w_in.weight
    std = 1 / math.sqrt(256)
    # Both LeCun: variance 1/fan_in; truncated at 2 standard deviations of the underlying normal.
    assert w_plain.std().item() == pytest.approx(std, rel=0.02)
    assert w_trunc.std().item() == pytest.approx(std, rel=0.02)
    assert w_trunc.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-7
    assert w_plain.abs().max().item() > 2.5 * std  # the plain normal has tails
    assert plain.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert trunc.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.02)
    flax = Transformer(ModelConfig(**big, emb_init="lecun", pos="learned"))  # std 1/sqrt(d_model)
    assert flax.tok_emb.weight.std().item() == pytest.approx(256**-0.5, rel=0.02)
    assert flax.pos_emb.weight.std().item() == pytest.approx(256**-0.5, rel=0.1)
    with pytest.raises(ValueError, match="emb_init_std"):
        ModelConfig(emb_init_std=0.0)


def test_tied_logit_scale() -> None:
    a = make(tie_embeddings=True)
    b = make(tie_embeddings=True, tied_logit_scale=True)
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    assert torch.allclose(b(idx).logits, a(idx).logits * 32**-0.5, atol=1e-6)
    untied = make(tie_embeddings=False, tied_logit_scale=True)  # only a tied head is scaled
    plain = make(tie_embeddings=False)
    plain.load_state_dict(untied.state_dict())
    assert torch.equal(untied(idx).logits, plain(idx).logits)
