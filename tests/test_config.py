"""Config: every shipped preset loads; bad keys and values are one-line errors naming choices."""

from __future__ import annotations

import pytest

from sparsetrace.cli import main
from sparsetrace.config import load_config, preset_names
from sparsetrace.errors import UserError


def test_every_shipped_preset_loads_and_validates() -> None:
    names = preset_names()
    assert {"cpu", "paper", "tiny"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.run_name == name
        assert len(cfg.model.widths) == cfg.model.n_layers


def test_paper_preset_matches_section_2_2() -> None:
    cfg = load_config("paper")
    assert (cfg.model.n_layers, cfg.model.d_ff, cfg.model.activation) == (6, 32768, "relu")
    assert (cfg.data.seq_len, cfg.train.batch_size) == (512, 16)
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps) == (3e-3, 5000, 1_000_000)
    assert cfg.data.source == "hf:allenai/c4:en"


def test_gpu_preset_is_the_cpu_conventions_at_the_papers_batch_and_depth() -> None:
    gpu, cpu = load_config("gpu"), load_config("cpu")
    for key in ("style", "pos", "emb_init", "activation", "n_layers"):
        assert getattr(gpu.model, key) == getattr(cpu.model, key), key
    assert gpu.train.min_lr_ratio == cpu.train.min_lr_ratio == 1.0
    assert (gpu.data.seq_len, gpu.train.batch_size, gpu.model.n_layers) == (512, 16, 6)
    tokens = gpu.train.steps * gpu.train.batch_size * gpu.data.seq_len
    assert tokens >= 300e6 and gpu.data.source == "prose"
    assert gpu.train.steps // gpu.checkpoint.every == 8  # the Sparsing Law curve's checkpoints
    assert gpu.train.log_every > 1 and gpu.trace.every == 100


def test_overrides_convert_types() -> None:
    cfg = load_config(
        "tiny",
        ["--train.lr", "1e-3", "--model.d_ff_per_layer", "[8, 16]", "--model.style=t5",
         "--trace.percentiles", "[10, 90]", "--data.max_docs", "null"],
    )  # fmt: skip
    assert cfg.train.lr == 1e-3
    assert cfg.model.widths == [8, 16]
    assert (cfg.model.style, cfg.model.norm, cfg.model.bias) == ("t5", "rmsnorm", False)
    assert cfg.trace.percentiles == [10.0, 90.0]
    assert cfg.data.max_docs is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.lrr", "1"], "unknown config key train.lrr; valid keys of train: steps"),
        (["--bogus.x", "1"], "unknown config key bogus"),
        (["--model.activation", "tanh"], "not one of relu, gelu, silu"),
        (["--train.steps", "ten"], "train.steps: expected a number"),
        (["--train.steps", "1.5"], "expected an integer"),
        (["--train.compile", "maybe"], "expected true or false"),
        (["--train.steps", "0"], "train.steps must be positive"),
        (["--model.n_heads", "3"], "not divisible by n_heads"),
        (["--data.val_fraction", "1.5"], "val_fraction must be in (0, 1)"),
        (["--train.lr"], "has no value"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_config_is_a_clear_error(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=None) as err:
        load_config("tiny", overrides)
    assert message in str(err.value)


def test_unknown_preset_and_missing_file(tmp_path) -> None:
    with pytest.raises(UserError, match="unknown preset 'nope'; choose one of cpu"):
        load_config("nope")
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(str(bad))


def test_broken_yaml_is_one_line_with_file_line_and_column(tmp_path, capsys) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  d_model: 128\n n_layers: [1, 2\ntrain:\n  lr: 3e-3\n")
    assert main(["train", "--preset", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sparsetrace: error: {broken}: invalid YAML at line 3, column 2: ")
    assert "\n" not in err and "Traceback" not in err


def test_cli_reports_config_errors_in_one_line(capsys) -> None:
    assert main(["train", "--preset", "tiny", "--model.bogus", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsetrace: error: unknown config key model.bogus")
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("outcome", "code", "stderr"),
    [(lambda: 2, 2, ""), (lambda: 1 / 0, 1, "ZeroDivisionError"),
     (lambda: exec("raise SystemExit('usage: bad')"), 1, "usage: bad")],
)  # fmt: skip
def test_the_command_leaves_through_parallelize_leave_with_mains_code(
    outcome, code: int, stderr: str, monkeypatch, capsys
) -> None:
    # Every way out of main -- a code, an uncaught error (traceback, 1), argparse's SystemExit --
    # passes its exit code through parallelize.leave (which ends FSDP processes early).
    import sparsetrace.cli as cli
    from sparsetrace.train import parallelize

    left = []
    monkeypatch.setattr(cli, "main", outcome)
    monkeypatch.setattr(parallelize, "leave", lambda c: left.append(c) or c)
    with pytest.raises(SystemExit) as stop:
        cli.entry()
    assert stop.value.code == code and left == [code]
    assert stderr in capsys.readouterr().err
