"""A decoder-only Transformer whose MLPs report their hidden-unit use from inside the forward pass.

Paper: Wild & Anderson, section 2.2 (6-layer decoder-only, ReLU MLP, LeCun-normal MLP kernels).

Each block's MLP is ``W_in -> act -> (mask) -> W_out``. Its hidden activation has the stable name
``blocks.{i}.mlp.hidden``; on a measured forward (``measure=True``) every MLP returns its
per-sequence use counts (see :func:`sparsetrace.metrics.use_counts`) computed in the graph, so the
statistics survive ``torch.compile`` (hooks would be dropped). Gated activations (swiglu, reglu,
geglu) measure ``act(gate) * up``, the input of ``W_out``.

Conventions (``style``): ``gpt2`` = biases, LayerNorm, learned absolute positions; ``t5`` = no
biases, RMSNorm, T5 relative position bias (bucketed, shared by all layers, as in T5). Any of
bias / norm / pos can be set on its own; ``pos sinusoidal`` adds the fixed sine/cosine table of
Vaswani et al. (Flax's ``AddPositionEmbs`` default). Initialisation: MLP kernels LeCun normal
(std 1/sqrt(fan_in), the paper), plain or truncated at two standard deviations with the variance
kept (Flax's ``variance_scaling(1, "fan_in", "truncated_normal")``); embeddings
N(0, ``emb_init_std``) (GPT-2: 0.02; T5: 1.0) or, ``emb_init lecun``, N(0, 1/d_model) (Flax's
``nn.Embed`` default); attention weights N(0, 0.02) with the output
projection scaled by 1/sqrt(2 * n_layers) (GPT-2); biases zero; norms one. A tied head can scale
its logits by d_model**-0.5 (t5x's ``logits_via_embedding``), which embeddings of std 1 need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["relu", "gelu", "silu", "relu2", "swiglu", "reglu", "geglu"]
GATED = {"swiglu": F.silu, "reglu": F.relu, "geglu": F.gelu}
PLAIN = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "relu2": lambda x: F.relu(x).square()}
STYLES = {
    "gpt2": {"bias": True, "norm": "layernorm", "pos": "learned"},
    "t5": {"bias": False, "norm": "rmsnorm", "pos": "relative"},
}


@dataclass
class ModelConfig:
    n_layers: int = 6
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 2048
    # Per-layer MLP widths (capacity experiment); overrides d_ff when given.
    d_ff_per_layer: list[int] | None = None
    activation: Activation = "relu"
    style: Literal["gpt2", "t5"] = "gpt2"
    # None: take the style's convention.
    bias: bool | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    pos: Literal["learned", "sinusoidal", "rope", "relative", "none"] | None = None
    tie_embeddings: bool = True
    tied_logit_scale: bool = False  # tied head: logits * d_model**-0.5 (t5x)
    # Embeddings: N(0, emb_init_std) ("normal"), or "lecun": std 1/sqrt(d_model), Flax's
    # nn.Embed default (variance_scaling(1, "fan_in") with fan_in = d_model).
    emb_init: Literal["normal", "lecun"] = "normal"
    emb_init_std: float = 0.02
    mlp_init: Literal["lecun_normal", "truncated_lecun_normal"] = "lecun_normal"
    relative_buckets: int = 32
    relative_max_distance: int = 128
    # Set from the data (tokenizer and packing); 0 means "not yet known".
    vocab_size: int = 0
    seq_len: int = 0
    widths: list[int] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self.widths = list(self.d_ff_per_layer or [self.d_ff] * self.n_layers)
        style = STYLES[self.style]
        self.bias = style["bias"] if self.bias is None else self.bias
        self.norm = style["norm"] if self.norm is None else self.norm
        self.pos = style["pos"] if self.pos is None else self.pos
        if len(self.widths) != self.n_layers:
            raise ValueError(
                f"d_ff_per_layer has {len(self.widths)} entries for {self.n_layers} layers"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError("rope needs an even head dimension")
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ValueError("sinusoidal positions need an even d_model")
        if self.emb_init_std <= 0:
            raise ValueError(f"emb_init_std must be positive, got {self.emb_init_std}")

    @property
    def embedding_std(self) -> float:
        return self.d_model**-0.5 if self.emb_init == "lecun" else self.emb_init_std

    def with_data(self, vocab_size: int, seq_len: int) -> ModelConfig:
        return replace(self, vocab_size=vocab_size, seq_len=seq_len)


class KVCache:
    """Keys and values of the positions decoded so far, one (k, v) pair per block, each
    (batch, heads, positions, head_dim): incremental decoding feeds only the new tokens."""

    def __init__(self, n_layers: int) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    @property
    def length(self) -> int:
        """Positions already in the cache (the next token's position)."""
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None
    # name -> int32 (batch, d_ff) per-sequence use counts; only on measured forwards.
    use_counts: dict[str, torch.Tensor] | None


def hidden_name(layer: int) -> str:
    return f"blocks.{layer}.mlp.hidden"


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model)
    return nn.LayerNorm(cfg.d_model, bias=bool(cfg.bias))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, d_ff: int) -> None:
        super().__init__()
        self.gated = cfg.activation in GATED
        self.act = GATED.get(cfg.activation) or PLAIN[cfg.activation]
        self.w_in = nn.Linear(cfg.d_model, d_ff * (2 if self.gated else 1), bias=cfg.bias)
        self.w_out = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)
        # 0/1 per hidden unit (masking experiment); `masked` skips the multiply when all ones.
        self.register_buffer("unit_mask", torch.ones(d_ff))
        self.masked = False

    def set_unit_mask(self, mask: torch.Tensor) -> None:
        self.unit_mask.copy_(mask.to(self.unit_mask))
        self.masked = bool((self.unit_mask != 1).any())

    def forward(self, x: torch.Tensor, measure: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.w_in(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        if self.masked:
            h = h * self.unit_mask.to(h.dtype)
        counts = (h != 0).sum(dim=-2, dtype=torch.int32) if measure else None
        return self.w_out(h), counts


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.rope = cfg.pos == "rope"

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        past = cache.layers[layer] if cache is not None else None
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if cache is not None:
            cache.layers[layer] = (k, v)
        if bias is not None:  # relative bias already carries the causal -inf
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        elif past is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new queries sit after the cached keys: causal with that offset
            causal = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal.tril(k.shape[2] - t))
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, d_ff: int) -> None:
        super().__init__()
        self.ln_attn, self.attn = _norm(cfg), Attention(cfg)
        self.ln_mlp, self.mlp = _norm(cfg), MLP(cfg, d_ff)

    def forward(
        self, x: torch.Tensor, measure: bool, bias: torch.Tensor | None, rope: tuple | None,
        cache: KVCache | None = None, layer: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        x = x + self.attn(self.ln_attn(x), bias, rope, cache, layer)
        out, counts = self.mlp(self.ln_mlp(x), measure)
        return x + out, counts


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.seq_len <= 0:
            raise ValueError("ModelConfig needs vocab_size and seq_len (ModelConfig.with_data)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        if cfg.pos == "sinusoidal":  # fixed, not a parameter; rebuilt, not saved
            self.register_buffer("pos_table", sinusoidal_table(cfg.seq_len, cfg.d_model),
                                 persistent=False)  # fmt: skip
        else:
            self.pos_table = None
        self.rel_bias = (
            nn.Embedding(cfg.relative_buckets, cfg.n_heads) if cfg.pos == "relative" else None
        )
        self.blocks = nn.ModuleList(Block(cfg, w) for w in cfg.widths)
        self.ln_f = _norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".mlp.w_" in name:  # LeCun normal: std = 1/sqrt(fan_in) (paper, 2.2)
                lecun_normal_(p, truncated=self.cfg.mlp_init == "truncated_lecun_normal")
            elif name.endswith("attn.proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            elif "emb" in name:
                nn.init.normal_(p, std=self.cfg.embedding_std)
            elif p.dim() >= 2 or "emb" in name:
                nn.init.normal_(p, std=0.02)
            else:  # norm gains
                nn.init.ones_(p)

    def mlps(self) -> dict[str, MLP]:
        return {hidden_name(i): blk.mlp for i, blk in enumerate(self.blocks)}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, measure: bool = False,
        cache: KVCache | None = None,
    ) -> ModelOutput:  # fmt: skip
        """Logits (and loss) of ``idx``; with a ``cache``, ``idx`` continues the cached
        positions and the cache grows by its length (incremental decoding)."""
        _, t = idx.shape
        start = cache.length if cache is not None else 0
        if start + t > self.cfg.seq_len and self.cfg.pos in ("learned", "sinusoidal"):
            raise ValueError(f"{start + t} positions: the model has {self.cfg.seq_len}")
        x = self.tok_emb(idx)
        positions = torch.arange(start, start + t, device=idx.device)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        if self.pos_table is not None:
            x = x + self.pos_table[start : start + t].to(x.dtype)  # a slice, not a gather
        bias = self._relative_bias(start, t, idx.device) if self.rel_bias is not None else None
        rope = self._rope(positions) if self.cfg.pos == "rope" else None
        counts: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x, c = block(x, measure, bias, rope, cache, i)
            if c is not None:
                counts[hidden_name(i)] = c
        logits = self.head(self.ln_f(x))
        if self.cfg.tie_embeddings and self.cfg.tied_logit_scale:
            logits = logits * self.cfg.d_model**-0.5
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return ModelOutput(logits, loss, counts if measure else None)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.cfg.d_model // self.cfg.n_heads // 2
        freqs = 10000.0 ** (-torch.arange(half, device=positions.device, dtype=torch.float32)
                            / half)  # fmt: skip
        angles = positions.float()[:, None] * freqs
        return angles.cos(), angles.sin()

    def _relative_bias(self, start: int, t: int, device: torch.device) -> torch.Tensor:
        """T5's causal relative position bias of queries ``start .. start + t`` over keys
        ``0 .. start + t``: (1, heads, t, start + t), -inf where the key follows the query."""
        query = torch.arange(start, start + t, device=device)
        key = torch.arange(start + t, device=device)
        distance = (query[:, None] - key[None, :]).clamp_min(0)  # query - key >= 0 (causal)
        buckets = _t5_bucket(distance, self.cfg.relative_buckets, self.cfg.relative_max_distance)
        bias = self.rel_bias(buckets).permute(2, 0, 1).unsqueeze(0)
        causal = key[None, :] <= query[:, None]
        return bias.masked_fill(~causal, float("-inf"))


def lecun_normal_(weight: torch.Tensor, truncated: bool = False) -> None:
    """std 1/sqrt(fan_in); truncated: at +-2 std of the underlying normal, rescaled so that the
    variance stays 1/fan_in (Flax's variance_scaling(1.0, "fan_in", "truncated_normal"))."""
    std = 1.0 / math.sqrt(weight.shape[1])
    if not truncated:
        nn.init.normal_(weight, std=std)
        return
    # Variance of a standard normal truncated to [-2, 2]: 0.7737...; its sqrt 0.87962566.
    std /= 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim): sin in the first half of the features, cos in the second (Flax's
    ``sinusoidal_init`` layout); frequency i is 10000**(-i / (dim / 2)) (Vaswani et al.)."""
    half = dim // 2
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1)


def _t5_bucket(distance: torch.Tensor, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's unidirectional bucketing: exact for small distances, log-spaced up to max_distance."""
    exact = n_buckets // 2
    is_small = distance < exact
    log_ratio = torch.log(distance.float().clamp_min(1) / exact) / math.log(max_distance / exact)
    large = (exact + log_ratio * (n_buckets - exact)).long().clamp_max(n_buckets - 1)
    return torch.where(is_small, distance, large)
