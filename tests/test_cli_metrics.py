"""``sparsetrace metrics`` in-process: JSON against the naive reference, table, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reference import reference_stats
from sparsetrace.cli import main
from sparsetrace.errors import UserError
from sparsetrace.io.activations import load_activation_file
from sparsetrace.metrics.records import format_records, stats_record

PCTS = [50.0, 12.5, 90.0]


def relu_acts(seed: int, shape: tuple[int, int, int], density: float) -> np.ndarray:
    """ReLU-like activations: multiples of 1/4 (exact in bfloat16), ``density`` of them nonzero."""
    rng = np.random.default_rng(seed)
    values = rng.integers(1, 9, shape) / 4
    return np.where(rng.random(shape) < density, values, 0.0).astype(np.float32)


ARRAYS = {
    "layer0": relu_acts(0, (3, 17, 40), 0.05),
    "layer1": relu_acts(1, (2, 9, 33), 0.4),
    "dead": np.zeros((2, 5, 6), np.float32),
}


def run_json(capsys: pytest.CaptureFixture[str], path: Path, pcts: str = "50,12.5,90") -> dict:
    assert main(["metrics", str(path), "--percentiles", pcts, "--json"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    return json.loads(out.out)


def check_record(rec: dict, acts: np.ndarray) -> None:
    """One JSON record against tests/reference.py."""
    want = reference_stats(acts, None, PCTS)
    batch, seq, hidden = acts.shape
    assert (rec["batch"], rec["seq"], rec["hidden"]) == (batch, seq, hidden)
    for key in ("per_token", "per_sequence", "per_batch"):
        assert rec[key] == float(want[key]), key
        assert rec[f"{key}_frac"] == float(want[key]) / hidden, key
    for key in ("token_seq_ratio", "seq_batch_ratio"):
        if math.isnan(float(want[key])):
            assert rec[key] is None, key
        else:
            assert rec[key] == float(want[key]), key
    assert list(rec["percentiles"]) == ["50", "12.5", "90"]
    for p, key in zip(PCTS, rec["percentiles"], strict=True):
        # The mean over sequences is summed in a different order than the reference's.
        assert rec["percentiles"][key] == pytest.approx(float(want["percentiles"][p]), rel=1e-14)
        assert 0.0 <= rec["percentiles"][key] <= 1.0


def test_npy_json_matches_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "acts.npy"
    np.save(path, ARRAYS["layer0"])
    records = run_json(capsys, path)
    assert list(records) == ["acts"]
    check_record(records["acts"], ARRAYS["layer0"])
    assert records["acts"]["per_token"] > 0  # the case is not trivially zero


def test_npz_json_matches_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "acts.npz"
    np.savez(path, **ARRAYS)
    records = run_json(capsys, path)
    assert list(records) == list(ARRAYS)
    for name, acts in ARRAYS.items():
        check_record(records[name], acts)
    assert records["dead"]["token_seq_ratio"] is None


def test_safetensors_json_matches_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "acts.safetensors"
    tensors = {
        "f32": torch.from_numpy(ARRAYS["layer0"]),
        "bf16": torch.from_numpy(ARRAYS["layer1"]).to(torch.bfloat16),
        "f16": torch.from_numpy(ARRAYS["dead"]).to(torch.float16),
    }
    save_file(tensors, str(path))
    records = run_json(capsys, path)
    assert sorted(records) == ["bf16", "f16", "f32"]
    check_record(records["f32"], ARRAYS["layer0"])
    check_record(records["bf16"], ARRAYS["layer1"])
    check_record(records["f16"], ARRAYS["dead"])


def test_bool_and_big_endian_arrays_are_accepted(tmp_path: Path) -> None:
    acts = ARRAYS["layer1"]
    np.savez(tmp_path / "a.npz", flags=acts != 0, big=acts.astype(">f4"))
    loaded = load_activation_file(tmp_path / "a.npz")
    assert loaded["flags"].dtype == torch.bool
    assert torch.equal(loaded["big"], torch.from_numpy(acts))
    assert stats_record(loaded["flags"], PCTS) == stats_record(loaded["big"], PCTS)


def test_table_lists_every_array(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "acts.npz"
    np.savez(path, **ARRAYS)
    assert main(["metrics", str(path), "--percentiles", "50,12.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(ARRAYS)
    header = lines[0].split()
    assert header[:2] == ["name", "shape"]
    assert "p50" in header and "p12.5" in header
    for line, (name, acts) in zip(lines[1:], ARRAYS.items(), strict=True):
        cells = line.split()
        assert cells[0] == name
        assert cells[1] == "x".join(map(str, acts.shape))
    # Right-aligned numeric columns: every row has the same length.
    assert len({len(line) for line in lines[1:]}) == 1


def test_format_records_values() -> None:
    rec = stats_record(torch.from_numpy(ARRAYS["layer1"]), [50.0])
    dead = stats_record(torch.from_numpy(ARRAYS["dead"]), [50.0])
    table = format_records({"layer1": rec, "dead": dead})
    cells = table.splitlines()[1].split()
    assert cells[2] == f"{100 * rec['per_token_frac']:.2f}"
    assert cells[5] == f"{rec['token_seq_ratio']:.3f}"
    assert cells[7] == f"{100 * rec['percentiles']['50']:.2f}"
    # 0/0 ratios print as "-".
    assert table.splitlines()[2].split()[5:7] == ["-", "-"]


def test_stats_record_is_json_serialisable_with_g_keys() -> None:
    rec = stats_record(torch.from_numpy(ARRAYS["dead"]), [0.0, 33.25, 100.0])
    text = json.dumps(rec, allow_nan=False)  # no NaN may leak into the JSON
    assert set(json.loads(text)["percentiles"]) == {"0", "33.25", "100"}
    assert set(rec) == {
        "batch",
        "seq",
        "hidden",
        "per_token",
        "per_sequence",
        "per_batch",
        "per_token_frac",
        "per_sequence_frac",
        "per_batch_frac",
        "token_seq_ratio",
        "seq_batch_ratio",
        "percentiles",
    }


def write_bad(tmp_path: Path, kind: str) -> tuple[Path, list[str]]:
    """A bad input file and the words its error message must contain."""
    if kind == "missing":
        return tmp_path / "nope.npy", ["nope.npy", "no such file"]
    if kind == "2d":
        np.save(tmp_path / "flat.npy", np.ones((4, 5), np.float32))
        return tmp_path / "flat.npy", ["flat.npy", "'acts'", "(4, 5)", "3 dimensions"]
    if kind == "4d":
        np.savez(tmp_path / "stack.npz", ok=np.ones((1, 2, 3)), layers=np.ones((2, 1, 2, 3)))
        return tmp_path / "stack.npz", ["stack.npz", "'layers'", "(2, 1, 2, 3)"]
    if kind == "strings":
        np.save(tmp_path / "words.npy", np.array([[["a", "b"]]]))
        return tmp_path / "words.npy", ["words.npy", "'acts'", "non-numeric"]
    if kind == "objects":
        np.savez(tmp_path / "obj.npz", things=np.array([[[{"x": 1}]]], dtype=object))
        return tmp_path / "obj.npz", ["obj.npz", "'things'"]
    if kind == "empty_file":
        (tmp_path / "empty.npy").write_bytes(b"")
        return tmp_path / "empty.npy", ["empty.npy", "empty"]
    if kind == "empty_array":
        np.save(tmp_path / "none.npy", np.ones((2, 0, 3), np.float32))
        return tmp_path / "none.npy", ["none.npy", "'acts'", "empty"]
    if kind == "corrupt_npy":
        np.save(tmp_path / "cut.npy", ARRAYS["layer0"])
        data = (tmp_path / "cut.npy").read_bytes()
        (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
        return tmp_path / "cut.npy", ["cut.npy"]
    if kind == "corrupt_npz":
        (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
        return tmp_path / "junk.npz", ["junk.npz", "zip"]
    if kind == "corrupt_safetensors":
        (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
        return tmp_path / "junk.safetensors", ["junk.safetensors"]
    if kind == "extension":
        (tmp_path / "acts.txt").write_text("1 2 3")
        return tmp_path / "acts.txt", ["acts.txt", "'.txt'", ".safetensors"]
    raise AssertionError(kind)


BAD_FILES = [
    "missing",
    "2d",
    "4d",
    "strings",
    "objects",
    "empty_file",
    "empty_array",
    "corrupt_npy",
    "corrupt_npz",
    "corrupt_safetensors",
    "extension",
]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_is_one_line_error_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    path, words = write_bad(tmp_path, kind)
    assert main(["metrics", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("sparsetrace: error: ")
    assert "Traceback" not in out.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    # The loader itself raises the one exception type for bad input.
    with pytest.raises(UserError):
        load_activation_file(path)


@pytest.mark.parametrize("pcts", ["abc", "50,x", "150", "-1", "nan", ","])
def test_bad_percentiles_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pcts: str
) -> None:
    path = tmp_path / "acts.npy"
    np.save(path, ARRAYS["layer0"])
    assert main(["metrics", str(path), f"--percentiles={pcts}"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert len(out.err.splitlines()) == 1
    assert out.err.startswith("sparsetrace: error: --percentiles")


def test_argument_help_joins_continuation_lines() -> None:
    from sparsetrace.cli import _param_help

    def verb(alpha: int = 1, beta: str = "", gamma: float = 0.5) -> None:
        """One line.

        Args:
            alpha: first part of alpha's help
                continued here: with a colon
            beta: 100% beta
            gamma: gamma
        """

    assert _param_help(verb) == {
        "alpha": "first part of alpha's help continued here: with a colon",
        "beta": "100%% beta",  # argparse formats help with %
        "gamma": "gamma",
    }
