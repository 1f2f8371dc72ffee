"""The Sparsing Law on Hugging Face models: every supported family's truncation against hooks of
our own at another site, the same weights measured as ours and as transformers', the export of a
run, a local checkpoint series measured one revision at a time, and bad input."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from sparsetrace.cli import main
from sparsetrace.errors import UserError
from sparsetrace.export import export_run, to_hf
from sparsetrace.model.transformer import ModelConfig, Transformer
from sparsetrace.sparsing import verbs
from sparsetrace.sparsing.laws import read_law_data
from sparsetrace.sparsing.over_training import sparsing_law
from sparsetrace.sparsing.search import C_TOL, PPL_TOL, Subject, TokenBatch, ppl_sparsity
from sparsetrace.sparsing.source import ModelOptions

VOCAB, LAYERS, D, FF = 96, 2, 32, 64
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
P = 5.0  # percent: a tiny random model needs a visible cut to truncate many units


def _llama(act: str) -> Callable[[], nn.Module]:
    return lambda: LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=D, intermediate_size=FF, num_attention_heads=2,
        num_key_value_heads=2, hidden_act=act, vocab_size=VOCAB, max_position_embeddings=64,
        **IDS))  # fmt: skip


def _gpt2(act: str) -> Callable[[], nn.Module]:
    return lambda: GPT2LMHeadModel(GPT2Config(
        n_layer=LAYERS, n_embd=D, n_head=2, n_inner=FF, activation_function=act, n_positions=64,
        vocab_size=VOCAB, **IDS))  # fmt: skip


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "gpt2-relu": _gpt2("relu"),
    "gpt2-gelu_new": _gpt2("gelu_new"),  # the tanh approximation
    "opt-relu": lambda: OPTForCausalLM(OPTConfig(
        num_hidden_layers=LAYERS, hidden_size=D, ffn_dim=FF, num_attention_heads=2,
        word_embed_proj_dim=D, vocab_size=VOCAB, max_position_embeddings=64, **IDS)),
    "gpt_neox-gelu": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        num_hidden_layers=LAYERS, hidden_size=D, intermediate_size=FF, num_attention_heads=2,
        hidden_act="gelu", vocab_size=VOCAB, max_position_embeddings=64, **IDS)),
    "llama-swiglu": _llama("silu"),
    "llama-reglu": _llama("relu"),
    "llama-geglu": _llama("gelu"),
}  # fmt: skip


def _batches(seed: int = 0) -> list[TokenBatch]:
    gen = torch.Generator().manual_seed(seed)
    windows = [torch.randint(3, VOCAB, (4, 17), generator=gen) for _ in range(2)]
    return [TokenBatch(w[:, :-1], w[:, 1:]) for w in windows]


def _mlps(model: nn.Module, family: str) -> list[nn.Module]:
    base = model.base_model
    if family.startswith("gpt2"):
        return [block.mlp for block in base.h]
    if family.startswith("opt"):
        return list(base.decoder.layers)  # fc1, activation_fn, fc2 live on the layer
    return [layer.mlp for layer in base.layers]


def _down_norms(mlp: nn.Module, family: str) -> Tensor:
    """||W_out[:, i]|| from the module's own weight layout (GPT-2's Conv1D is (d_ff, d_model))."""
    if family.startswith("gpt2"):
        return mlp.c_proj.weight.float().norm(dim=1)
    down = {"opt": "fc2", "gpt_neox": "dense_4h_to_h", "llama": "down_proj"}[family.split("-")[0]]
    return getattr(mlp, down).weight.float().norm(dim=0)


@contextmanager
def zeroed_below(model: nn.Module, family: str, taus: list[float]) -> Iterator[list[Tensor]]:
    """Independent truncation at another site: the activation function's output (plain MLPs) or
    the up projection's output (Llama: h = act(gate) * up, zeroed through up), keeping units with
    |h_i| * ||W_out[:, i]|| >= tau; yields each layer's truncated hidden activation."""
    kept: list[Tensor] = []
    handles = []
    for mlp, tau in zip(_mlps(model, family), taus, strict=True):
        norms = _down_norms(mlp, family)

        def keep(h: Tensor, norms: Tensor = norms, tau: float = tau) -> Tensor:
            return (h.float().abs() * norms >= tau) & (h != 0)

        if family.startswith("llama"):
            gate: dict[str, Tensor] = {}
            handles.append(mlp.act_fn.register_forward_hook(
                lambda _m, _a, y, gate=gate: gate.update(a=y)))  # fmt: skip

            def up_hook(_m, _a, u: Tensor, gate=gate, keep=keep) -> Tensor:
                h = gate["a"] * u
                kept.append((h * keep(h)).detach())
                return u * keep(h)

            handles.append(mlp.up_proj.register_forward_hook(up_hook))
        else:
            act = {"gpt2": "act", "opt": "activation_fn", "gpt_neox": "act"}[family.split("-")[0]]

            def act_hook(_m, _a, h: Tensor, keep=keep) -> Tensor:
                kept.append((h * keep(h)).detach())
                return h * keep(h)

            handles.append(getattr(mlp, act).register_forward_hook(act_hook))
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def _mean_loss(model: nn.Module, batches: list[TokenBatch]) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b.inputs).logits.double()
            total += float(
                F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), reduction="sum")
            )
            n += b.targets.numel()
    return total / n


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_equals_independent_hooks(family: str) -> None:
    """At the thresholds the search found: the truncated loss equals our own hooks' at another
    site, the activation ratio equals a hand count of their nonzero entries, and the PPL ratio
    is the target within the search's tolerance."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    batches = _batches()
    found = ppl_sparsity(Subject(model, batches), P)
    m = found.measurement
    taus = [m.layers[f"blocks.{i}.mlp.hidden"].tau for i in range(LAYERS)]
    dense = _mean_loss(model, batches)
    with zeroed_below(model, family, taus) as kept:
        truncated = _mean_loss(model, batches)
    assert m.loss_dense == pytest.approx(dense, rel=1e-6)
    assert m.loss_sparse == pytest.approx(truncated, rel=1e-6)
    # hand count: nonzero entries of each layer's truncated activation, mean over layers
    ratios = []
    for layer in range(LAYERS):
        acts = kept[layer::LAYERS]  # one entry per batch and layer, in forward order
        ratios.append(sum(int((a != 0).sum()) for a in acts) / sum(a.numel() for a in acts))
    assert m.activation_ratio == pytest.approx(sum(ratios) / LAYERS, abs=1e-12)
    dense_ratio = Subject(model, batches).reference.dense.mean_activation_ratio
    assert m.activation_ratio < dense_ratio  # the cut removed units
    target = 1 + P / 100
    tolerance_met = abs(m.ppl_ratio - target) <= PPL_TOL * P / 100
    assert tolerance_met or found.search.hi - found.search.lo <= C_TOL
    assert m.ppl_ratio == pytest.approx(math.exp(truncated - dense), rel=1e-6)


@pytest.mark.parametrize(
    "options",
    [{"activation": "relu"}, {"activation": "gelu"},
     {"style": "t5", "pos": "rope", "activation": "swiglu"},
     {"style": "t5", "pos": "rope", "activation": "reglu", "tie_embeddings": False}],
    ids=["gpt2-relu", "gpt2-gelu", "llama-swiglu", "llama-reglu-untied"],
)  # fmt: skip
def test_the_same_weights_as_ours_and_as_transformers_give_the_same_sparsity(options) -> None:
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(n_layers=LAYERS, d_model=D, n_heads=2, d_ff=FF,
                                   vocab_size=VOCAB, seq_len=16, **options)).eval()  # fmt: skip
    theirs = to_hf(ours)
    batches = _batches(1)
    assert torch.allclose(ours(batches[0].inputs).logits, theirs(batches[0].inputs).logits,
                          atol=1e-6)  # fmt: skip
    a = ppl_sparsity(Subject(ours, batches), P).measurement
    b = ppl_sparsity(Subject(theirs, batches), P).measurement
    assert b.cett == pytest.approx(a.cett, rel=1e-5)
    assert b.activation_ratio == pytest.approx(a.activation_ratio, abs=1e-4)
    assert b.ppl_ratio == pytest.approx(a.ppl_ratio, rel=1e-5)
    for name, layer in a.layers.items():
        assert b.layers[name].tau == pytest.approx(layer.tau, rel=1e-5)
        assert b.layers[name].activation_ratio == pytest.approx(layer.activation_ratio, abs=1e-4)


def test_export_refuses_a_model_without_a_counterpart(tmp_path: Path) -> None:
    t5 = Transformer(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, vocab_size=40,
                                 seq_len=8, style="t5"))  # fmt: skip
    with pytest.raises(UserError, match="positions relative"):
        to_hf(t5)
    gated = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, vocab_size=40, seq_len=8,
                        activation="swiglu")  # fmt: skip
    learned_gated = Transformer(gated)
    with pytest.raises(UserError, match="plain activation"):
        to_hf(learned_gated)


# ------------------------------------------------------------------------------------------------
# A local checkpoint series: a tiny run with a BPE tokenizer, each checkpoint exported

PER_STEP = 4 * 32  # the tiny preset: 4 sequences of 32 tokens per step
STEPS = (4, 8, 12, 16, 20)  # five checkpoints: a law fit needs five points


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory, tiny_run: Callable) -> Path:
    """The tiny preset with a BPE tokenizer (run "r"), each checkpoint exported to series/."""
    base = tmp_path_factory.mktemp("hf-series")
    with tiny_run(base, "--data.tokenizer", "bpe", "--data.vocab_size", "512",
                  "--checkpoint.every", "4") as run:  # fmt: skip
        for step in STEPS:
            export_run(run, base / "series" / f"step{step}", step)
    return base / "series"


@pytest.mark.slow
def test_export_writes_a_model_transformers_loads(series: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsetrace.checkpoint import load_trained_model

    run = series.parent / "r"
    ours, _ = load_trained_model(run)
    theirs = AutoModelForCausalLM.from_pretrained(series / "step20").eval()
    tok = AutoTokenizer.from_pretrained(series / "step20")
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog")["input_ids"]])
    assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert tok.eos_token_id == theirs.config.eos_token_id
    with pytest.raises(UserError, match="not an empty directory"):
        export_run(run, series / "step20")
    with pytest.raises(UserError, match="not an empty directory"):
        export_run(run, run)  # a run directory would turn into a model directory
    with pytest.raises(UserError, match="no checkpoint at step 7"):
        export_run(run, series / "x", 7)


@pytest.mark.slow
def test_series_one_revision_at_a_time(
    series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_loads: Callable
) -> None:
    """c searched on the last revision alone: when a revision loads, no other is alive; the
    JSON has every revision with its step, label and tokens; the curve and fit are written."""
    monkeypatch.setenv("SPARSETRACE_CACHE", str(series.parent / "cache"))
    out = tmp_path / "law"
    verbs.sparsing_law(str(series), tokens=2048, seq_len=32, search_last=1,
                       tokens_per_step=PER_STEP, out=out)  # fmt: skip
    assert model_loads() == [0] * len(STEPS)
    summary = json.loads((out / "sparsing_law.json").read_text())
    assert [c["revision"] for c in summary["checkpoints"]] == [f"step{s}" for s in STEPS]
    assert [c["tokens"] for c in summary["checkpoints"]] == [s * PER_STEP for s in STEPS]
    assert summary["search"]["revisions"] == ["step20"] and summary["x"] == "tokens"
    assert summary["tokens_evaluated"] == 2048 and summary["seq_len"] == 32
    # the 64 windows are a random sample of a pool of four times as many
    assert summary["windows_pool"] == 4 * 64
    assert all(c["layers"]["0"]["units"] == 128 for c in summary["checkpoints"])
    frame = pd.read_csv(out / "sparsing_law.csv", dtype={"layer": str})
    assert list(frame[frame.layer == "all"].tokens) == [s * PER_STEP for s in STEPS]
    # the tiny preset's ReLU, exported as GPT-2's activation, is fitted with the ReLU law's form
    assert (out / "sparsing_law.png").is_file() and (out / "sparsing_law_fit_relu.png").is_file()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"]["architecture"] == "gpt2" and meta["model"]["d_ff"] == [128, 128]
    from sparsetrace.report import write_report

    index = write_report([out], tmp_path / "report")
    page = (index.parent / "report.md").read_text()
    assert "PPL-1% sparsity per layer" in page and "Activation ratio over training" in page
    # no use metrics by design: neither the paper's empty tables nor a warning about them
    assert "Table 1" not in page and "no sparsity measurements" not in page


@pytest.mark.slow
def test_a_run_and_its_exported_checkpoint_agree(
    series: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same weights through both paths (the run's checkpoint and the exported directory,
    each loaded and located by its own path) on the same windows: the same c, thresholds and
    ratios."""
    from sparsetrace.sparsing.source import open_source

    monkeypatch.setenv("SPARSETRACE_CACHE", str(series.parent / "cache"))
    run = open_source(str(series.parent / "r"), ModelOptions(), 1024)
    hf = open_source(str(series / "step20"), ModelOptions(seq_len=32), 1024)
    batches = run.batches(1024)
    measured = []
    for src in (run, hf):
        model = src.load(src.revisions[-1])
        measured.append(ppl_sparsity(Subject(model, batches, src.sites(model)), 1.0).measurement)
    a, b = measured
    assert type(run.load(run.revisions[-1])).__name__ == "Transformer"
    assert type(hf.load(hf.revisions[-1])).__name__ == "GPT2LMHeadModel"
    assert b.cett == pytest.approx(a.cett, rel=1e-6)
    assert b.activation_ratio == pytest.approx(a.activation_ratio, abs=1e-6)
    assert b.ppl_ratio == pytest.approx(a.ppl_ratio, rel=1e-6)
    for name, layer in a.layers.items():
        assert b.layers[name].tau == pytest.approx(layer.tau, rel=1e-6)


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(
    series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(series.parent / "cache"))
    out = tmp_path / "law"
    out.mkdir()
    (out / "sparsing_law.json").write_text("{}")
    options = ModelOptions(seq_len=32, out=out)
    with pytest.raises(UserError, match="no revision step99"):
        sparsing_law(str(series), 1.0, 1024, options=replace(options, revisions=("step99",)))
    capsys.readouterr()
    args = ["sparsing-law", str(series), "--revisions", "step99", "--out", str(out)]
    assert main(args) == 2  # the command line: one line on stderr, exit code 2
    err = capsys.readouterr().err
    assert err.startswith("sparsetrace: error:") and err.count("\n") == 1
    with pytest.raises(UserError, match="below one window of 32 tokens"):
        sparsing_law(str(series / "step20"), 1.0, 16, options=options)
    gptj = tmp_path / "gptj"
    GPTJForCausalLM(GPTJConfig(n_layer=1, n_embd=32, n_head=2, rotary_dim=8, n_positions=64,
                               vocab_size=512)).save_pretrained(gptj)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (gptj / name).write_text((series / "step20" / name).read_text())
    with pytest.raises(UserError, match=r"cannot find the MLPs of GPTJForCausalLM.*--modules"):
        sparsing_law(str(gptj), 1.0, 1024, options=options)
    assert (out / "sparsing_law.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["sparsing_law.json"]
    # named by hand, the same model is measured
    by_hand = replace(options, modules=("transformer.h.0.mlp.fc_out",))
    sparsing_law(str(gptj), 1.0, 1024, options=by_hand)
    assert json.loads((out / "sparsing_law.json").read_text())["checkpoints"][0]["layers"]["0"]


@pytest.mark.slow
def test_baselines_on_a_model_directory(
    series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARSETRACE_CACHE", str(series.parent / "cache"))
    out = tmp_path / "b"
    verbs.sparsing_baselines(str(series / "step20"), tokens=1024, seq_len=32, out=out)
    summary = json.loads((out / "sparsing_baselines.json").read_text())
    assert summary["revision"] == "step20"
    assert [m["method"] for m in summary["methods"]] == ["cett", "topk", "fat"]
    target = summary["target_ppl_ratio"]
    for m in summary["methods"]:
        assert abs(m["ppl_ratio"] - target) <= 0.05 * (target - 1) + 1e-3


@pytest.mark.slow
def test_a_model_placed_by_device_map_gives_the_same_measurement(
    series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accelerate's device_map path (the model stays where it put it; the tokens go to its
    embedding's device) measures what the plain path does."""
    monkeypatch.setenv("SPARSETRACE_CACHE", str(series.parent / "cache"))
    found = []
    for name, device_map in (("plain", ""), ("placed", "cpu")):
        options = ModelOptions(seq_len=32, device_map=device_map, out=tmp_path / name)
        csv = sparsing_law(str(series / "step20"), 1.0, 1024, options=options)
        found.append(json.loads((csv.parent / "sparsing_law.json").read_text()))
    plain, placed = found
    assert placed["cett"] == plain["cett"]
    assert (
        placed["checkpoints"][0]["activation_ratio"] == plain["checkpoints"][0]["activation_ratio"]
    )
    assert "device_map: cpu" in (tmp_path / "placed" / "config.yaml").read_text()


@pytest.mark.slow
def test_a_series_without_tokens_per_step_is_measured_over_steps_with_step_0(
    series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pythia-style revisions including step 0 and no tokens per step: the axis is the step,
    step 0 is measured but left out of the fit, and the verb finishes (and prints its table)."""
    import shutil

    monkeypatch.setenv("SPARSETRACE_CACHE", str(series.parent / "cache"))
    steps = tmp_path / "steps"
    for name in ("step4", "step8", "step12", "step16", "step20"):
        shutil.copytree(series / name, steps / name)
    shutil.copytree(series / "step4", steps / "step0")  # the weights do not matter here
    verbs.sparsing_law(str(steps), tokens=1024, seq_len=32, search_last=1, out=tmp_path / "o")
    summary = json.loads((tmp_path / "o" / "sparsing_law.json").read_text())
    assert summary["x"] == "steps" and summary["tokens_per_step"] is None
    assert [c["step"] for c in summary["checkpoints"]] == [0, 4, 8, 12, 16, 20]
    assert all(c["tokens"] is None for c in summary["checkpoints"])
    tokens, _ = read_law_data(tmp_path / "o")
    assert list(tokens) == [4, 8, 12, 16, 20]  # over steps, step 0 left out
    assert list((tmp_path / "o").glob("sparsing_law_fit_*.png"))
    with pytest.raises(UserError, match="numbered by position"):
        sparsing_law(str(series / "step20"), 1.0, 1024,
                     options=ModelOptions(seq_len=32, tokens_per_step=128))  # fmt: skip


@pytest.mark.slow
def test_replicates_on_a_model_directory_leave_the_evaluation_set_alone(
    series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicate sets come from further pools of the text: the evaluation set (and so the main
    result) is the same with and without them; each set is measured on its own windows."""
    monkeypatch.setenv("SPARSETRACE_CACHE", str(series.parent / "cache"))
    found = []
    for name, replicates in (("alone", 0), ("with", 2)):
        csv = verbs_measure(series / "step20", tmp_path / name, replicates)
        found.append(json.loads((csv.parent / "sparsing_law.json").read_text()))
    alone, with_sets = found
    assert with_sets["cett"] == alone["cett"]
    assert (
        with_sets["checkpoints"][0]["activation_ratio"]
        == alone["checkpoints"][0]["activation_ratio"]
    )
    sets = with_sets["replicates"]["sets"]
    assert len(sets) == 2 and sets[0]["activation_ratio"] != sets[1]["activation_ratio"]


def verbs_measure(model: Path, out: Path, replicates: int) -> Path:
    options = ModelOptions(seq_len=32, out=out)
    return sparsing_law(str(model), 1.0, 512, final_only=True, replicates=replicates,
                        options=options)  # fmt: skip


@pytest.mark.slow
def test_offloaded_mlp_weights_are_refused(
    series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose MLP weights accelerate offloaded (read only inside its forward) cannot be
    truncated by hooks: a one-line error, not a traceback from a meta tensor."""
    from accelerate import dispatch_model
    from accelerate.utils import offload_state_dict
    from transformers import AutoModelForCausalLM

    from sparsetrace.sparsing.source import open_source

    monkeypatch.setenv("SPARSETRACE_CACHE", str(series.parent / "cache"))
    src = open_source(str(series / "step20"), ModelOptions(seq_len=32, device_map="cpu"), 512)
    model = AutoModelForCausalLM.from_pretrained(series / "step20")
    offload_state_dict(tmp_path / "off", {k: v for k, v in model.state_dict().items()
                                          if k.startswith("transformer.h.1.")})  # fmt: skip
    device_map = dict.fromkeys(["transformer.wte", "transformer.wpe", "transformer.h.0",
                                "transformer.ln_f", "lm_head"], "cpu")  # fmt: skip
    device_map["transformer.h.1"] = "disk"
    placed = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "off"))
    rev = src.revisions[-1]
    monkeypatch.setattr(rev, "load", lambda: placed)
    with pytest.raises(UserError, match="offloaded MLP weights"):
        src.load(rev)


def test_reference_baselines_read_the_llama_gate() -> None:
    """On a transformers Llama the reference FAT-ε decides on act_fn's output, not on the
    product the down projection sees: its loss equals our own hooks zeroing the product where
    |act(gate)| < eps (and differs from deciding on the product)."""
    from sparsetrace.sparsing.baselines import evaluate_baseline

    torch.manual_seed(0)
    model = FAMILIES["llama-reglu"]().eval()
    batches = _batches()
    subject = Subject(model, batches)
    assert set(subject.sites.gates) == set(subject.down)
    eps = 0.05
    point = evaluate_baseline(subject, "fat", eps, "reference")
    ours = evaluate_baseline(subject, "fat", eps, "ours")
    handles = []
    for layer in model.model.layers:
        gate: dict[str, Tensor] = {}
        mlp = layer.mlp
        handles.append(mlp.act_fn.register_forward_hook(
            lambda _m, _a, y, gate=gate: gate.update(a=y)))  # fmt: skip
        handles.append(mlp.up_proj.register_forward_hook(
            lambda _m, _a, u, gate=gate: u * (gate["a"].abs() >= eps)))  # fmt: skip
    try:
        truncated = _mean_loss(model, batches)
    finally:
        for h in handles:
            h.remove()
    dense = _mean_loss(model, batches)
    assert point.ppl_ratio == pytest.approx(math.exp(truncated - dense), rel=1e-6)
    assert ours.ppl_ratio != pytest.approx(point.ppl_ratio, rel=1e-6)
