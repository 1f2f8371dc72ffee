"""``sparsetrace.analysis.trace`` on tiny random transformers models, against activations captured
independently with plain hooks (or recomputed from the MLP's input) and ``use_stats``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd
import pytest
import torch
from torch import Tensor, nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sparsetrace.analysis import trace
from sparsetrace.errors import UserError
from sparsetrace.metrics import use_stats, use_stats_from_counts
from sparsetrace.model.transformer import ModelConfig, Transformer
from sparsetrace.rundir import percentile_column
from sparsetrace.sites import DOWN_INPUT, GATE_OUTPUT

VOCAB, LAYERS, D, FF = 100, 2, 32, 64
SMALL = {"vocab_size": VOCAB, "max_position_embeddings": 64}
# Token ids of pad and eos inside the tiny vocabulary (the defaults point past it).
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
LLAMA_LIKE = {"num_hidden_layers": LAYERS, "hidden_size": D, "intermediate_size": FF,
              "num_attention_heads": 2, "num_key_value_heads": 2, "hidden_act": "relu",
              **SMALL, **IDS}  # fmt: skip


def gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=D, n_head=2, n_inner=FF,
                                      activation_function="relu", n_positions=64,
                                      vocab_size=VOCAB, **IDS))  # fmt: skip


def opt() -> nn.Module:
    return OPTForCausalLM(OPTConfig(num_hidden_layers=LAYERS, hidden_size=D, ffn_dim=FF,
                                    num_attention_heads=2, word_embed_proj_dim=D, **SMALL,
                                    **IDS))  # fmt: skip


def neox() -> nn.Module:
    return GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=LAYERS, hidden_size=D,
                                            intermediate_size=FF, num_attention_heads=2,
                                            hidden_act="relu", **SMALL, **IDS))  # fmt: skip


def llama_like(kind: type, config: type) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = kind(config(**LLAMA_LIKE))
        with torch.no_grad():  # up_proj rows of zeros: units the gate uses but the product never
            for layer in model.model.layers:
                layer.mlp.up_proj.weight[:8] = 0
        return model

    return build


llama = llama_like(LlamaForCausalLM, LlamaConfig)


# Which module's output is the hidden activation, per architecture (independent of the tracer's
# choice of the down projection's input); OPT flattens tokens, reshaped by the caller.
ACT_MODULE: dict[str, Callable[[nn.Module, int], nn.Module]] = {
    "gpt2": lambda m, i: m.transformer.h[i].mlp.act,
    "opt": lambda m, i: m.model.decoder.layers[i].activation_fn,
    "gpt_neox": lambda m, i: m.gpt_neox.layers[i].mlp.act,
}


@contextmanager
def captured(model: nn.Module, arch: str, gated: str = "product") -> Iterator[list[list[Tensor]]]:
    """Per forward pass, each layer's hidden activation, captured by plain forward hooks."""
    seen: list[list[Tensor]] = []
    layers = range(LAYERS)

    def keep(i: int, value: Tensor) -> None:
        if i == 0:
            seen.append([])
        seen[-1].append(value.detach().clone())

    if arch in ACT_MODULE:
        mods = [ACT_MODULE[arch](model, i) for i in layers]
        hooks = [
            m.register_forward_hook(lambda _m, _a, y, i=i: keep(i, y)) for i, m in enumerate(mods)
        ]
    else:  # llama-like: recompute from the MLP's input
        mlps = [model.model.layers[i].mlp for i in layers]

        def hidden(mlp: nn.Module, x: Tensor) -> Tensor:
            gate = mlp.act_fn(mlp.gate_proj(x))
            return gate if gated == "gate" else gate * mlp.up_proj(x)

        hooks = [
            m.register_forward_hook(lambda m, a, _y, i=i: keep(i, hidden(m, a[0])))
            for i, m in enumerate(mlps)
        ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def assert_matches(summary: pd.DataFrame, batch: int, layer: int, acts: Tensor, mask) -> None:
    """The tracer's row for (batch, layer) equals use_stats of the captured activation."""
    ref = use_stats(acts.float(), mask)
    row = summary[(summary.batch == batch) & (summary.layer == layer)]
    assert len(row) == 1
    row = row.iloc[0]
    assert row.hidden == acts.shape[-1]
    assert row.per_token == pytest.approx(float(ref.per_token))
    assert row.per_sequence == pytest.approx(float(ref.per_sequence))
    assert row.per_batch == pytest.approx(float(ref.per_batch))
    for p, v in ref.percentiles.items():
        assert row[percentile_column(p)] == pytest.approx(float(v))
    assert row.tokens == (acts.shape[0] * acts.shape[1] if mask is None else int(mask.sum()))


def _padding_mask(batch: int, seq: int) -> Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 4 :] = 0  # right padding
    mask[1, :3] = 0  # left padding
    mask[2, :] = 0  # no real token at all
    return mask


ARCHS = {
    "gpt2": gpt2, "opt": opt, "gpt_neox": neox, "llama": llama,
    "mistral": llama_like(MistralForCausalLM, MistralConfig),
    "qwen2": llama_like(Qwen2ForCausalLM, Qwen2Config),
}  # fmt: skip
ARCH_NAME = {"mistral": "llama", "qwen2": "llama"}  # the same MLP as Llama


@pytest.mark.parametrize("arch", ARCHS)
def test_trace_matches_independent_hooks_with_padding(arch: str) -> None:
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    ids = torch.randint(3, VOCAB, (4, 12))
    mask = _padding_mask(4, 12)
    with torch.no_grad(), captured(model, ARCH_NAME.get(arch, arch)) as seen, trace(model) as t:
        model(ids, attention_mask=mask)
        model(input_ids=ids[:, :9])
    assert t.architecture == ARCH_NAME.get(arch, arch)
    assert t.n_batches == 2 and len(seen) == 2
    summary = t.summary()
    assert list(summary.name) == [f"blocks.{i}.mlp.hidden" for i in range(LAYERS)] * 2
    assert set(summary.measured) == {DOWN_INPUT}
    for batch, (acts, m) in enumerate(zip(seen, [mask, None], strict=True)):
        for layer in range(LAYERS):
            a = acts[layer]
            if a.dim() == 2:  # OPT's fc1/fc2 see tokens flattened
                a = a.view(4, -1, a.shape[-1])
            assert_matches(summary, batch, layer, a, m)
    # The padding makes a difference (else the test would not test the mask).
    unmasked = use_stats(seen[0][0].view(4, 12, -1).float())
    ref = {"per_token": unmasked.per_token, "per_sequence": unmasked.per_sequence,
           "p50": unmasked.percentiles[50.0], "p90": unmasked.percentiles[90.0]}  # fmt: skip
    assert summary.loc[0, list(ref)].tolist() != pytest.approx([float(v) for v in ref.values()])


def test_gated_product_and_gate_only() -> None:
    torch.manual_seed(1)
    model = llama().eval()
    ids = torch.randint(3, VOCAB, (3, 10))
    frames = {}
    for gated in ("product", "gate"):
        with (
            torch.no_grad(),
            captured(model, "llama", gated) as seen,
            trace(model, gated=gated) as t,
        ):
            model(ids)
        frames[gated] = t.summary()
        for layer in range(LAYERS):
            assert_matches(frames[gated], 0, layer, seen[0][layer], None)
    assert set(frames["gate"].measured) == {GATE_OUTPUT}
    assert list(frames["gate"].module) == [f"model.layers.{i}.mlp.act_fn" for i in range(LAYERS)]
    # Units with a zero up_proj row are used by the gate, never by the product.
    assert (frames["product"].per_batch <= FF - 8).all()
    assert (frames["gate"].per_batch > frames["product"].per_batch).all()
    with pytest.raises(UserError, match="not gated"):
        trace(gpt2(), gated="gate")
    with pytest.raises(UserError, match="gated must be"):
        trace(model, gated="both")


def test_own_transformer_matches_in_graph_counts_and_gate() -> None:
    torch.manual_seed(2)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=48, activation="reglu")
    model = Transformer(cfg.with_data(VOCAB, 16)).eval()
    ids = torch.randint(0, VOCAB, (3, 16))
    with torch.no_grad(), trace(model) as t:
        counts = model(ids, measure=True).use_counts
    rows = t.summary()
    for layer, (name, c) in enumerate(counts.items()):
        ref = use_stats_from_counts(c, 16)
        row = rows[rows.name == name].iloc[0]
        assert row.module == f"blocks.{layer}.mlp.w_out"
        assert row.per_token == pytest.approx(float(ref.per_token))
        assert row.per_batch == pytest.approx(float(ref.per_batch))
    # gate only: act(gate half of w_in), captured independently from w_in's output
    gates: list[Tensor] = []

    def keep_gate(module: nn.Module, args: tuple, y: Tensor) -> None:
        gates.append(torch.relu(y.chunk(2, -1)[0]))

    hooks = [blk.mlp.w_in.register_forward_hook(keep_gate) for blk in model.blocks]
    with torch.no_grad(), trace(model, gated="gate") as t:
        model(ids)
    for h in hooks:
        h.remove()
    for layer, g in enumerate(gates):
        assert_matches(t.summary(), 0, layer, g, None)


def test_bf16_model() -> None:
    torch.manual_seed(3)
    model = gpt2().eval().to(torch.bfloat16)
    ids = torch.randint(3, VOCAB, (3, 10))
    mask = _padding_mask(3, 10)
    with torch.no_grad(), captured(model, "gpt2") as seen, trace(model) as t:
        model(ids, attention_mask=mask)
    assert seen[0][0].dtype == torch.bfloat16
    for layer in range(LAYERS):
        assert_matches(t.summary(), 0, layer, seen[0][layer], mask)


def test_layer_selection_and_custom_modules() -> None:
    torch.manual_seed(4)
    model = gpt2().eval()
    ids = torch.randint(3, VOCAB, (2, 8))

    def names(layers) -> list[str]:
        with torch.no_grad(), trace(model, layers=layers) as t:
            model(ids)
        return list(t.summary().name)

    one = ["blocks.1.mlp.hidden"]
    assert names(r"blocks\.1\.") == one
    assert names([1]) == one and names(one) == one
    assert names(lambda name: name.startswith("blocks.1")) == one
    assert names(None) == ["blocks.0.mlp.hidden", "blocks.1.mlp.hidden"]
    for bad, match in ((r"blocks\.7", "selects none"), ([5], "unknown"), ("(", "regular")):
        with pytest.raises(UserError, match=match):
            trace(model, layers=bad)
    # A module named by its dotted path: its input is measured, named by its position.
    custom = trace(model, modules=["transformer.h.1.mlp.c_proj"])
    with torch.no_grad(), captured(model, "gpt2") as seen, custom as t:
        model(ids)
    assert t.architecture == "custom" and list(t.summary().module) == ["transformer.h.1.mlp.c_proj"]
    assert_matches(t.summary(), 0, 0, seen[0][1], None)
    with pytest.raises(UserError, match="not found"):
        trace(model, modules=["transformer.h.9.mlp"])
    with pytest.raises(UserError, match="cannot find the MLPs"):
        trace(nn.Sequential(nn.Linear(4, 4)))


def test_set_mask_overrides_and_kv_cache_mask() -> None:
    torch.manual_seed(5)
    model = gpt2().eval()
    ids = torch.randint(3, VOCAB, (3, 6))
    mask = _padding_mask(3, 6)
    with torch.no_grad(), captured(model, "gpt2") as seen, trace(model) as t:
        t.set_mask(mask)
        model(ids)  # no attention_mask given to the model: the explicit mask applies
        t.set_mask(None)
        # With a KV cache the next token's mask covers the past tokens too.
        past = model(ids, attention_mask=mask, use_cache=True).past_key_values
        step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        model(ids[:, :1], attention_mask=step_mask, past_key_values=past, use_cache=True)
    summary = t.summary()
    for layer in range(LAYERS):
        assert_matches(summary, 0, layer, seen[0][layer], mask)
        assert_matches(summary, 1, layer, seen[1][layer], mask)
        assert_matches(summary, 2, layer, seen[2][layer], step_mask[:, -1:])
    with pytest.raises(UserError, match=r"\(batch, seq\)"):
        t.set_mask(torch.ones(3))


def _tensor_elements(obj: object, seen: set[int] | None = None) -> int:
    """Elements of all tensors reachable from obj through dicts, lists, tuples and sets."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_tensor_elements(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple | set):
        return sum(_tensor_elements(v, seen) for v in obj)
    return 0


def test_memory_stays_flat() -> None:
    """After the forward, the tracer holds no activation: per layer two (hidden,) masks, and one
    small row of numbers per batch."""
    torch.manual_seed(6)
    model = opt().eval()
    ids = torch.randint(3, VOCAB, (4, 16))
    held = {}
    with torch.no_grad(), trace(model) as t:
        for n in range(1, 7):
            model(ids, attention_mask=torch.ones_like(ids))
            state = {k: v for k, v in vars(t).items() if k not in ("model", "sites")}
            held[n] = (_tensor_elements(state), len(t._rows))
    # Two (hidden,) masks per layer, and the current batch's attention mask (the caller's and
    # its copy on the activations' device): nothing the size of an activation (4 x 16 x 64).
    assert held[2][0] == held[6][0] == LAYERS * 2 * FF + 2 * 4 * 16
    assert [rows for _, rows in held.values()] == [n * LAYERS for n in range(1, 7)]
    assert all(len(values) == 9 for _, _, values in t._rows)  # 5 numbers + 4 percentiles


def test_aggregate_layer_stats_and_union_masks() -> None:
    torch.manual_seed(7)
    model = neox().eval()
    with torch.no_grad(), captured(model, "gpt_neox") as seen, trace(model) as t:
        for _ in range(3):
            model(torch.randint(3, VOCAB, (2, 8)))
    per_batch, agg = t.summary(), t.summary(aggregate=True)
    assert list(agg.batches) == [3, 3] and list(agg.tokens) == [48, 48]
    for layer in range(LAYERS):
        rows = per_batch[per_batch.layer == layer]
        row = agg[agg.layer == layer].iloc[0]
        assert row.per_token == pytest.approx(rows.per_token.mean())
        assert row.token_seq_ratio == pytest.approx(row.per_token / row.per_sequence)
        union = torch.stack([(s[layer] != 0).flatten(0, 1).any(0) for s in seen]).any(0)
        first = (seen[0][layer] != 0).flatten(0, 1).any(0)
        name = f"blocks.{layer}.mlp.hidden"
        assert torch.equal(t.ever_used[name], union)
        assert torch.equal(t.first_batch_used[name], first)
        stats = t.layer_stats()[name]
        assert float(stats.per_batch) == pytest.approx(row.per_batch)
        assert torch.equal(stats.batch_used, union)
    # Hooks are gone after the block; the results stay.
    model(torch.randint(3, VOCAB, (2, 8)))
    assert t.n_batches == 3
