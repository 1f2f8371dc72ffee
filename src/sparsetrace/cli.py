"""The ``sparsetrace`` command line: one verb per function; each function's signature is its schema.

A verb's positional parameters become positional arguments, keyword parameters become
``--options`` (bool: a flag), the first docstring line is its help. ``train`` and ``run`` also take
free ``--section.key value`` config overrides. Bad input (:class:`UserError`) is one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

from sparsetrace.budgets import SPARSING_TOKENS
from sparsetrace.errors import UserError


def metrics(file: Path, percentiles: str = "50,65,75,90", json: bool = False) -> None:
    """Use metrics of saved activations (.npy, .npz, .safetensors).

    Args:
        file: a .npy array (batch, seq, hidden), or .npz / .safetensors with one array per layer
        percentiles: comma-separated rescaled percentiles (paper A.6.1)
        json: print one JSON object per array instead of a table
    """
    import json as jsonlib

    from sparsetrace.io.activations import load_activation_file
    from sparsetrace.metrics.records import format_records, stats_record

    pcts = _parse_percentiles(percentiles)
    records = {name: stats_record(acts, pcts) for name, acts in load_activation_file(file).items()}
    print(jsonlib.dumps(records, indent=2) if json else format_records(records))


def _parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--percentiles must be comma-separated numbers; got {text!r}") from None
    if not values or any(not 0 <= p <= 100 for p in values):
        raise UserError(f"--percentiles must be numbers in [0, 100]; got {text!r}")
    return values


def train(preset: str = "cpu", resume: bool = False, overrides: list[str] | None = None) -> None:
    """Train a model and trace its sparsity (preset name or YAML, plus --section.key overrides).

    Args:
        preset: a shipped preset (cpu, cpu-gpt2, cpu-long, gpu, paper, tiny) or a YAML file
        resume: continue the run from its newest checkpoint
    """
    from sparsetrace.config import load_config
    from sparsetrace.train.loop import train as train_run

    run_dir = train_run(load_config(preset, overrides), resume=resume, command=_command())
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(f"run directory: {run_dir}")


def report(runs: list[Path], out: Path | None = None) -> None:
    """Write the paper's tables and figures for one or more run directories.

    Args:
        runs: run directories (several: tables side by side, figures in a grid)
        out: output directory (default: RUN/report, or reports/compare for several runs)
    """
    from sparsetrace.report import write_report

    out_dir = out or (runs[0] / "report" if len(runs) == 1 else Path("reports") / "compare")
    print(f"report: {write_report(list(runs), out_dir)}")


def run(
    preset: str = "cpu",
    sparsing_tokens: int = SPARSING_TOKENS.run,
    overrides: list[str] | None = None,
) -> None:
    """The main job: train the preset on its corpus, write the report, print a summary.

    Args:
        preset: a shipped preset (cpu, cpu-gpt2, cpu-long, gpu, paper, tiny) or a YAML file
        sparsing_tokens: validation tokens for the report's Sparsing Law section (0: skip it)
    """
    from sparsetrace.config import load_config
    from sparsetrace.report import text_summary, write_report
    from sparsetrace.sparsing.over_training import sparsing_law
    from sparsetrace.train.loop import train as train_run

    if sparsing_tokens < 0:
        raise UserError(f"--sparsing-tokens must be >= 0; got {sparsing_tokens}")
    cfg = load_config(preset, overrides)
    cfg.run_name = _free_run_name(Path(cfg.out_dir), cfg.run_name)
    run_dir = train_run(cfg, command=_command())
    if sparsing_tokens:
        # c is searched on the final checkpoint alone (the public scripts average the last 5:
        # each candidate c would then cost 5 passes) and applied to every checkpoint, which
        # then costs 3 passes: the over-training curve fits in the main job's budget.
        print(f"Sparsing Law: PPL-1% sparsity at every checkpoint on {sparsing_tokens:,} "
              "validation tokens...", flush=True)  # fmt: skip
        try:
            sparsing_law(run_dir, p=1.0, tokens=sparsing_tokens, last=1)
        except UserError as err:  # the run and its report matter more than this section
            print(f"Sparsing Law section skipped: {err}", file=sys.stderr)
        except Exception:  # a bug: still write the trained run's report, then show the bug
            write_report([run_dir], run_dir / "report")
            print(f"Sparsing Law measurement failed; the run {run_dir} and its report without "
                  f"it are written (`sparsetrace sparsing-law {run_dir} --tokens "
                  f"{sparsing_tokens}` measures it, with c searched on the last 5 "
                  "checkpoints)", file=sys.stderr)  # fmt: skip
            raise
    index = write_report([run_dir], run_dir / "report")
    print(text_summary(run_dir))
    print(f"\nrun directory: {run_dir}\nreport: {index}")


def _free_run_name(out_dir: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... so that the main job never overwrites a run."""
    candidate, n = name, 1
    while (out_dir / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def export_hf(run: Path, out: Path, step: int = -1) -> None:
    """Write a run's checkpoint as a Hugging Face model directory (GPT-2 or Llama layout).

    Args:
        run: a sparsetrace run directory with checkpoints
        out: the directory to write (model weights, config.json and the run's tokenizer)
        step: the checkpoint's step (-1: the last)
    """
    from sparsetrace.export import export_run

    written = export_run(run, out, None if step < 0 else step)
    print(f"wrote {written} (load it with transformers' AutoModelForCausalLM.from_pretrained)")


def _command() -> str:
    return " ".join(["sparsetrace", *sys.argv[1:]])


def _verbs() -> list[Callable[..., Any]]:
    from sparsetrace.analysis.verbs import analyze
    from sparsetrace.experiments.verbs import (
        experiment_activations,
        experiment_capacity,
        experiment_mask,
        experiment_width_depth,
        prune,
        sweep,
    )
    from sparsetrace.sparsing.verbs import fit_law, sparsing_baselines, sparsing_law
    from sparsetrace.speed.verbs import speed

    return [
        run, train, report, metrics, experiment_mask, experiment_capacity, sweep, prune,
        analyze, sparsing_law, sparsing_baselines, fit_law, experiment_activations,
        experiment_width_depth, speed, export_hf,
    ]  # fmt: skip


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsetrace", description="Measure and trace activation sparsity in Transformer MLPs."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for fn in _verbs():
        name = fn.__name__.rstrip("_").replace("_", "-")
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        # argparse %-formats a help string, not a description
        verb = sub.add_parser(name, help=doc.replace("%", "%%"), description=doc)
        hints, helps = get_type_hints(fn), _param_help(fn)
        for pname, param in inspect.signature(fn).parameters.items():
            if pname == "overrides":  # free --section.key value pairs, parsed by the config
                continue
            typ = hints.get(pname, str)
            conv = _converter(typ)
            if param.default is inspect.Parameter.empty:
                nargs = "+" if typ == list[Path] else None
                verb.add_argument(pname, type=conv, nargs=nargs, help=helps.get(pname))
            elif typ is bool:
                verb.add_argument(
                    f"--{pname.replace('_', '-')}", action="store_true", help=helps.get(pname)
                )
            else:
                help_text = helps.get(pname, "")
                verb.add_argument(
                    f"--{pname.replace('_', '-')}", type=conv, default=param.default,
                    help=f"{help_text} (default: %(default)s)".strip(),
                )  # fmt: skip
        verb.set_defaults(_fn=fn)
    return parser


def _param_help(fn: Callable[..., Any]) -> dict[str, str]:
    """``name: text`` entries of the docstring's ``Args:`` block; a line indented deeper than
    its entry continues it."""
    doc = inspect.getdoc(fn) or ""
    if "Args:" not in doc:
        return {}
    helps: dict[str, str] = {}
    name, indent = None, 0
    for line in doc.split("Args:", 1)[1].splitlines():
        depth = len(line) - len(line.lstrip())
        if name and line.strip() and depth > indent:
            helps[name] += " " + line.strip().replace("%", "%%")
            continue
        key, sep, text = line.strip().partition(": ")
        name, indent = (key, depth) if sep and key.isidentifier() else (None, 0)
        if name:
            helps[name] = text.replace("%", "%%")
    return helps


def _converter(typ: Any) -> Callable[[str], Any]:
    optional = {Path | None: Path, int | None: int, float | None: float}
    if typ in optional:
        return optional[typ]
    if typ in (int, float, Path):
        return typ
    if typ == list[Path]:
        return Path
    return str


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["experiment"] and len(argv) > 1:  # `experiment mask` == `experiment-mask`
        argv = [f"experiment-{argv[1]}", *argv[2:]]
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    fn = args._fn
    kwargs = {k: v for k, v in vars(args).items() if k not in ("verb", "_fn")}
    if "overrides" in inspect.signature(fn).parameters:
        kwargs["overrides"] = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        fn(**kwargs)
    except UserError as err:
        print(f"sparsetrace: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsetrace: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `sparsetrace metrics x.npy --json | head`
        sys.stderr.close()
        return 0
    return 0


def entry() -> None:
    """``sparsetrace`` and ``python -m sparsetrace``: :func:`main`, then leave the process the way
    :func:`sparsetrace.train.parallelize.leave` says (a distributed run's gloo workers), failed
    runs included: an uncaught error prints its traceback and exits 1, as Python would."""
    import traceback

    from sparsetrace.train.parallelize import leave

    try:
        code = main()
    except SystemExit as stop:  # argparse: usage errors and --help
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    except BaseException:  # reported as Python reports it, then leave()
        traceback.print_exc()
        code = 1
    raise SystemExit(leave(code))
