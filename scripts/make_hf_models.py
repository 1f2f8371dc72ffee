"""Make small Hugging Face models from packaged data, for the Sparsing Law on "any" model here.

    python scripts/make_hf_models.py [OUT]          (default: build/hf)

Nothing downloads on this machine, so the models are trained here on the embedded corpus
(Shakespeare, shipped with sparsetrace) with a BPE tokenizer, then exported with
``sparsetrace export-hf``:
- OUT/gpt2-relu/step{N}: a ReLU GPT-2 (GPT2LMHeadModel) saved at 6 steps: a checkpoint series;
- OUT/llama-swiglu: a SwiGLU Llama (LlamaForCausalLM), the final checkpoint: one model directory.
Each directory holds the model, config.json and the tokenizer. The runs themselves stay in
OUT/runs. About 20 s on two CPU cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sparsetrace.checkpoint import checkpoint_step, list_checkpoints
from sparsetrace.config import load_config
from sparsetrace.export import export_run
from sparsetrace.train.loop import train

COMMON = ["--data.tokenizer", "bpe", "--data.vocab_size", "2048", "--data.seq_len", "64",
          "--model.n_layers", "2", "--model.d_model", "64", "--model.d_ff", "512",
          "--train.steps", "300", "--train.batch_size", "8", "--train.warmup_steps", "30",
          "--train.lr", "3e-3", "--checkpoint.every", "50", "--checkpoint.keep", "0",
          "--trace.every", "50", "--eval.every", "100"]  # fmt: skip
MODELS = {
    "gpt2-relu": ["--model.style", "gpt2", "--model.activation", "relu"],
    "llama-swiglu": ["--model.style", "t5", "--model.pos", "rope", "--model.activation",
                     "swiglu"],
}  # fmt: skip


def main(out: Path) -> None:
    for name, options in MODELS.items():
        cfg = load_config("tiny", [*COMMON, *options, "--out_dir", str(out / "runs"),
                                   "--run_name", name])  # fmt: skip
        run = train(cfg)
        if name == "llama-swiglu":
            export_run(run, out / name)
            continue
        for ckpt in list_checkpoints(run):
            step = checkpoint_step(ckpt)
            export_run(run, out / name / f"step{step}", step)
    print(f"wrote {out / 'gpt2-relu'} (a checkpoint series) and {out / 'llama-swiglu'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build/hf"))
