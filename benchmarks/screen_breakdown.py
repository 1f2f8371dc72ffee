"""Where the int8-screen MLP block spends its time: the fused kernel, the modules one after the
other, and each step alone against its bytes.

GPT-2-medium's MLP shape (24 layers, d_model 1024, d_ff 4096, float32), random weights, each
layer's (gate) bias shifted so that ``--active`` of the units fire for the token; one token per
call. Timed interleaved, best of ``--repeats``, per 24 layers, plain ReLU and ReGLU:

- the dense block on the sparse paths' own loop (``DenseGemv`` up and down);
- the screened block fused (``SparseMlp``: one ``mlp_rows`` call per layer, as the speed verb
  runs it);
- the same modules one after the other (``SparseUp``, torch's activation, ``SparseDown``);
- plain only, each step alone on the same inputs: the int8 screen (``screen_int8``), the screen
  with the candidates' float32 rows (``mlp_rows`` without a down projection), the active
  units' W_out rows (``sparse_rows_matvec``).

Each line gives milliseconds, the bytes the step reads, the bandwidth that makes, and its share
of the dense block's bandwidth (1.0: as fast per byte as the dense GEMV).

    python benchmarks/screen_breakdown.py [--active 0.15] [--repeats 7]
"""

from __future__ import annotations

import argparse

D_MODEL, D_FF, LAYERS = 1024, 4096, 24


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--active", type=float, default=0.15)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import numba
    import numpy as np
    import torch

    from sparsetrace.speed.dense_gemv import DenseGemv
    from sparsetrace.speed.kernels import screen_int8, sparse_rows_matvec
    from sparsetrace.speed.measure import best_times
    from sparsetrace.speed.sparse_down import SparseDown
    from sparsetrace.speed.sparse_up import SparseMlp, SparseUp

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, D_MODEL, generator=gen)
    xs = x.numpy()
    blocks: dict[str, list] = {"relu": [], "reglu": []}
    for kind, ff_in in (("relu", D_FF), ("reglu", 2 * D_FF)):
        for _ in range(LAYERS):
            w_in = torch.randn(ff_in, D_MODEL, generator=gen) / D_MODEL**0.5
            w_out = torch.randn(D_MODEL, D_FF, generator=gen) / D_FF**0.5
            bias = torch.zeros(ff_in)
            bias[:D_FF] = -torch.quantile(w_in[:D_FF] @ x[0], 1 - args.active)  # `active` fire
            gated = kind == "reglu"
            up, down = SparseUp(w_in, bias, gated=gated, screen=True), SparseDown(w_out)
            blocks[kind].append((SparseMlp(up, down), DenseGemv(w_in, bias), DenseGemv(w_out)))

    def act(kind: str, pre: torch.Tensor) -> torch.Tensor:
        if kind == "relu":
            return torch.relu(pre)
        gate, value = pre.chunk(2, dim=-1)
        return torch.relu(gate) * value

    plain = blocks["relu"]
    hidden = [act("relu", du(x)) for _, du, _ in plain]
    flags = np.empty((1, D_FF), np.bool_)
    out = np.empty((1, D_MODEL), np.float32)
    threads = numba.get_num_threads()
    minus_one = np.float32(-1.0)

    def screen() -> None:
        for mlp, _, _ in plain:
            a = mlp.up.views()
            screen_int8(a["q"], a["scales"], a["slack"], a["first_b"], xs, np.float32(1.0), flags,
                        threads)  # fmt: skip

    def down_rows() -> None:
        for (mlp, _, _), h in zip(plain, hidden, strict=True):
            v = mlp.down.views()
            sparse_rows_matvec(h.numpy(), v["table"], v["norms"], minus_one, out, threads)

    calls = {}
    for kind, layers in blocks.items():
        calls[f"{kind}: dense block (DenseGemv up + down)"] = (
            lambda k=kind, ls=layers: [dd(act(k, du(x))) for _, du, dd in ls])  # fmt: skip
        calls[f"{kind}: screened block, fused (the verb's)"] = (
            lambda ls=layers: [mlp(x) for mlp, _, _ in ls])  # fmt: skip
        calls[f"{kind}: screened block, module by module"] = (
            lambda k=kind, ls=layers: [m.down(act(k, m.up(x))) for m, _, _ in ls])  # fmt: skip
    calls |= {"  relu: screen_int8 alone": screen,
              "  relu: screen + candidates' rows": lambda: [m.up.compute(xs) for m, _, _ in plain],
              "  relu: W_out rows alone": down_rows}  # fmt: skip
    for mlp, _, _ in plain + blocks["reglu"]:
        mlp.up.reset_counts()
        mlp.down.reset_counts()
        mlp(x)
    c = {k: float(np.mean([m.up.candidate_fraction for m, _, _ in ls])) for k, ls in blocks.items()}
    a = {k: float(np.mean([m.down.read_fraction for m, _, _ in ls])) for k, ls in blocks.items()}
    matrix = 4 * D_FF * D_MODEL * LAYERS
    screen_bytes = D_FF * (D_MODEL + 12) * LAYERS
    nbytes = {}
    for kind in blocks:
        gated = kind == "reglu"
        sparse = screen_bytes + (c[kind] + a[kind] * (2 if gated else 1)) * matrix
        nbytes |= {f"{kind}: dense block (DenseGemv up + down)": (3 if gated else 2) * matrix,
                   f"{kind}: screened block, fused (the verb's)": sparse,
                   f"{kind}: screened block, module by module": sparse}  # fmt: skip
    nbytes |= {"  relu: screen_int8 alone": screen_bytes,
               "  relu: screen + candidates' rows": screen_bytes + c["relu"] * matrix,
               "  relu: W_out rows alone": a["relu"] * matrix}  # fmt: skip
    t = best_times(calls, args.repeats)
    print(
        f"GPT-2-medium MLP shape, {LAYERS} layers, one token; active {a['relu']:.3f} (relu), "
        f"{a['reglu']:.3f} (reglu), candidates {c['relu']:.3f}, {c['reglu']:.3f}; "
        f"{torch.get_num_threads()} torch threads, {numba.get_num_threads()} numba"
    )
    for name, seconds in t.items():
        kind = name.strip().split(":")[0]
        dense = f"{kind}: dense block (DenseGemv up + down)"
        rate = nbytes[name] / seconds
        print(f"{name:44s} {1e3 * seconds:7.2f} ms  {nbytes[name] / 2**20:7.1f} MiB  "
              f"{rate / 1e9:5.1f} GB/s  {rate / (nbytes[dense] / t[dense]):4.2f} of dense's rate"
              )  # fmt: skip
    for kind in blocks:
        dense = t[f"{kind}: dense block (DenseGemv up + down)"]
        fused = t[f"{kind}: screened block, fused (the verb's)"]
        apart = t[f"{kind}: screened block, module by module"]
        bound = nbytes[f"{kind}: dense block (DenseGemv up + down)"] / nbytes[
            f"{kind}: screened block, fused (the verb's)"]  # fmt: skip
        print(f"{kind}: speed-up over dense fused {dense / fused:.2f}x, module by module "
              f"{dense / apart:.2f}x; bound at dense's rate {bound:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
