"""A run's checkpoint as a Hugging Face model directory (``from_pretrained`` layout).

Two layouts carry sparsetrace's conventions exactly (the logits agree to float precision):
- GPT-2 (``GPT2LMHeadModel``): the ``gpt2`` style (biases, LayerNorm, learned positions), tied
  embeddings, a plain activation (relu, gelu, silu, relu2);
- Llama (``LlamaForCausalLM``): no biases, RMSNorm, rotary positions, a gated MLP (swiglu, reglu,
  geglu: ``hidden_act`` silu, relu, gelu), tied or untied embeddings.
Other configurations (relative or sinusoidal positions, per-layer widths, unit masks, a scaled tied
head) have no such counterpart and are refused. The run's BPE tokenizer is saved with the model
(``PreTrainedTokenizerFast``, end-of-text as EOS), so the directory works with ``AutoTokenizer``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparsetrace.checkpoint import checkpoint_step, list_checkpoints, load_trained_model
from sparsetrace.errors import UserError
from sparsetrace.model.transformer import Transformer

HF_ACTIVATION = {"relu": "relu", "gelu": "gelu", "silu": "silu", "relu2": "relu2",
                 "swiglu": "silu", "reglu": "relu", "geglu": "gelu"}  # fmt: skip


def export_run(run: Path, out: Path, step: int | None = None) -> Path:
    """Write checkpoint ``step`` of ``run`` (default: the last) to ``out`` as a Hugging Face model
    directory with the run's tokenizer; returns ``out``, which must be new or empty."""
    from transformers import PreTrainedTokenizerFast

    from sparsetrace.data import prepare_data

    run, out = Path(run), Path(out)
    ckpts = list_checkpoints(run)
    if not ckpts:
        raise UserError(f"{run}: no checkpoint to export")
    chosen = ckpts[-1] if step is None else next(
        (c for c in ckpts if checkpoint_step(c) == step), None)  # fmt: skip
    if chosen is None:
        have = ", ".join(str(checkpoint_step(c)) for c in ckpts)
        raise UserError(f"{run}: no checkpoint at step {step} (have: {have})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory; choose another")
    model, cfg = load_trained_model(run, chosen)
    _refuse(model)  # before anything is written
    tokenizer = prepare_data(cfg.data).tokenizer
    if not hasattr(tokenizer, "tok"):
        raise UserError(f"{run}: the run's tokenizer is {cfg.data.tokenizer}; exporting needs "
                        "a BPE tokenizer (data.tokenizer bpe, a tokenizer.json or "
                        "hf:NAME)")  # fmt: skip
    eos = tokenizer.tok.id_to_token(tokenizer.eot_id)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok, eos_token=eos)
    hf = to_hf(model, tokenizer.eot_id)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def to_hf(model: Transformer, eos_token_id: int | None = None) -> torch.nn.Module:
    """``model`` as a transformers causal LM with the same weights (GPT-2 or Llama layout);
    ``eos_token_id``: the tokenizer's end-of-text (also BOS, as in GPT-2)."""
    _refuse(model)
    ids = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    hf = _gpt2(model, ids) if model.cfg.pos == "learned" else _llama(model, ids)
    return hf.eval()


def _refuse(model: Transformer) -> None:
    why = _unsupported(model)
    if why:
        raise UserError(f"cannot export this model to a Hugging Face layout: {why}")


def _unsupported(model: Transformer) -> str:
    cfg = model.cfg
    if len(set(cfg.widths)) != 1:
        return "per-layer MLP widths"
    if any(mlp.masked for mlp in model.mlps().values()):
        return "unit masks (the masking experiment) are applied"
    if cfg.tie_embeddings and cfg.tied_logit_scale:
        return "a scaled tied head (tied_logit_scale)"
    gated = cfg.activation in ("swiglu", "reglu", "geglu")
    if (cfg.pos, cfg.norm, cfg.bias) == ("learned", "layernorm", True):
        return "" if not gated and cfg.tie_embeddings else (
            "the GPT-2 layout needs a plain activation and tied embeddings")  # fmt: skip
    if (cfg.pos, cfg.norm, cfg.bias) == ("rope", "rmsnorm", False):
        return "" if gated else "the Llama layout needs a gated MLP (swiglu, reglu, geglu)"
    return (
        f"positions {cfg.pos}, norm {cfg.norm}, bias {cfg.bias}: only GPT-2's (learned, "
        "layernorm, biases) and Llama's (rope, rmsnorm, no biases) have a counterpart"
    )


def _gpt2(model: Transformer, ids: dict[str, int | None]) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.d_model,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.widths[0],
        activation_function=HF_ACTIVATION[cfg.activation], resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=model.ln_f.eps, tie_word_embeddings=True, **ids,
    )  # fmt: skip
    state = {"transformer.wte.weight": model.tok_emb.weight,
             "transformer.wpe.weight": model.pos_emb.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias,
             "lm_head.weight": model.tok_emb.weight}  # fmt: skip
    for i, block in enumerate(model.blocks):
        pre = f"transformer.h.{i}."
        # GPT-2's Conv1D stores (in, out): the transpose of nn.Linear's weight
        pairs = {"ln_1": block.ln_attn, "ln_2": block.ln_mlp, "attn.c_attn": block.attn.qkv,
                 "attn.c_proj": block.attn.proj, "mlp.c_fc": block.mlp.w_in,
                 "mlp.c_proj": block.mlp.w_out}  # fmt: skip
        for name, module in pairs.items():
            linear = name.startswith(("attn", "mlp"))
            state[f"{pre}{name}.weight"] = module.weight.T if linear else module.weight
            state[f"{pre}{name}.bias"] = module.bias
    return _filled(GPT2LMHeadModel(config), state)


def _llama(model: Transformer, ids: dict[str, int | None]) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.cfg
    d, ff = cfg.d_model, cfg.widths[0]
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, hidden_act=HF_ACTIVATION[cfg.activation],
        max_position_embeddings=cfg.seq_len, rms_norm_eps=torch.finfo(torch.float32).eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, **ids,
    )  # fmt: skip
    state = {
        "model.embed_tokens.weight": model.tok_emb.weight,
        "model.norm.weight": model.ln_f.weight,
        "lm_head.weight": model.head.weight,
    }
    for i, block in enumerate(model.blocks):
        pre = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split(d)
        gate, up = block.mlp.w_in.weight.split(ff)
        state.update({
            f"{pre}input_layernorm.weight": block.ln_attn.weight,
            f"{pre}post_attention_layernorm.weight": block.ln_mlp.weight,
            f"{pre}self_attn.q_proj.weight": q, f"{pre}self_attn.k_proj.weight": k,
            f"{pre}self_attn.v_proj.weight": v,
            f"{pre}self_attn.o_proj.weight": block.attn.proj.weight,
            f"{pre}mlp.gate_proj.weight": gate, f"{pre}mlp.up_proj.weight": up,
            f"{pre}mlp.down_proj.weight": block.mlp.w_out.weight,
        })  # fmt: skip
    return _filled(LlamaForCausalLM(config), state)


def _filled(hf: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``hf`` with every parameter taken from ``state`` (all of them: none left at its init)."""
    own = hf.state_dict()
    missing = set(own) - set(state) - {k for k in own if k.endswith("rotary_emb.inv_freq")}
    if missing:
        raise AssertionError(f"export leaves parameters at their init: {sorted(missing)[:4]}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.detach().to(own[name].dtype))
    return hf
