"""Convolution speed: NumPy reference vs each C++ version (tinydiff._C) vs PyTorch CPU.

    python benchmarks/bench_conv.py            # the ContextUnet's conv shapes at batch 64
    python benchmarks/bench_conv.py --quick    # batch 4, one run each: a smoke test of seconds

Each row is one convolution shape of the course's ContextUnet (in_channels 1, n_feat 64, 16x16
images), timed forward and backward (backward = dx and dw). A transposed convolution runs as our
kernels run it: forward = conv2d_backward_input, backward = conv2d_forward + conv2d_backward_weight.
"uses" is how often the shape occurs in one ContextUnet pass; the last row sums time x uses, the
convolution time of one training step (counting dx of the first layer too, which training skips). Times are in ms (best of several runs); GFLOP/s counts
2*N*O*OH*OW*C*kh*kw per pass (three passes for forward + backward). PyTorch (if installed) runs
with as many threads as OpenMP gives us. The machine's NumPy float32 matmul GFLOP/s is measured
in the same run, as the yardstick.

conv2d_add_forward, the convolution that adds a per-sample shift and a residual as it stores (a UNet
block's time embedding and skip connection), has a table of its own at the end.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_time, load_torch, machine_line, markdown_table, matmul_gflops  # noqa: E402

from tinydiff import _C, kernels  # noqa: E402

# name, uses per pass, transposed?, (C_in, C_out, H of the input, kernel, stride, padding)
SHAPES = [
    ("conv 1->64 16x16", 1, False, (1, 64, 16, 3, 1, 1)),
    ("conv 1x1 1->64 16x16", 1, False, (1, 64, 16, 1, 1, 0)),
    ("conv 64->64 16x16", 9, False, (64, 64, 16, 3, 1, 1)),
    ("conv 128->64 16x16", 1, False, (128, 64, 16, 3, 1, 1)),
    ("conv 64->1 16x16", 1, False, (64, 1, 16, 3, 1, 1)),
    ("conv 64->128 8x8", 1, False, (64, 128, 8, 3, 1, 1)),
    ("conv 128->128 8x8", 3, False, (128, 128, 8, 3, 1, 1)),
    ("conv 64->64 8x8", 4, False, (64, 64, 8, 3, 1, 1)),
    ("convT 128->128 k4 s4 1->4", 1, True, (128, 128, 1, 4, 4, 0)),
    ("convT 256->64 k2 s2 4->8", 1, True, (256, 64, 4, 2, 2, 0)),
    ("convT 128->64 k2 s2 8->16", 1, True, (128, 64, 8, 2, 2, 0)),
]


def make_passes(shape, transposed, batch, impl, dtype=np.float32):
    """(forward, backward) closures for one shape and one implementation, and the flops of a pass."""
    cin, cout, h, k, s, p = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cin, h, h), dtype=dtype)
    if not transposed:
        w = rng.standard_normal((cout, cin, k, k), dtype=dtype) * 0.05
        b = rng.standard_normal(cout, dtype=dtype)
        oh = (h + 2 * p - k) // s + 1
        flops = 2 * batch * cout * oh * oh * cin * k * k
    else:
        w = rng.standard_normal((cin, cout, k, k), dtype=dtype) * 0.05
        b = rng.standard_normal(cout, dtype=dtype)
        oh = (h - 1) * s - 2 * p + k
        flops = 2 * batch * cin * h * h * cout * k * k
    dout = rng.standard_normal((batch, cout, oh, oh), dtype=dtype)

    if impl == "torch":
        import torch
        tx, tw, tb, tdout = (torch.from_numpy(a) for a in (x, w, b, dout))
        conv = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
        fwd = lambda: conv(tx, tw, tb, stride=s, padding=p)                          # noqa: E731
        bwd = lambda: torch.ops.aten.convolution_backward(                           # noqa: E731
            tdout, tx, tw, [cout], [s, s], [p, p], [1, 1], transposed, [0, 0], 1, [True, True, False])
        return fwd, bwd, flops

    if impl == "numpy":
        forward, back_in, back_w = (kernels.conv2d_forward_ref, kernels.conv2d_backward_input_ref,
                                    kernels.conv2d_backward_weight_ref)
    else:
        forward = lambda *a: _C.conv2d_forward(*a, version=impl)                     # noqa: E731
        back_in = lambda *a: _C.conv2d_backward_input(*a, version=impl)              # noqa: E731
        back_w = lambda *a: _C.conv2d_backward_weight(*a, version=impl)              # noqa: E731
    if not transposed:
        fwd = lambda: forward(x, w, b, s, p)                                         # noqa: E731
        bwd = lambda: (back_in(dout, w, (h, h), s, p), back_w(dout, x, (k, k), s, p))  # noqa: E731
    else:
        fwd = lambda: back_in(x, w, (oh, oh), s, p)                                  # noqa: E731
        bwd = lambda: (forward(dout, w, None, s, p), back_w(x, dout, (k, k), s, p))  # noqa: E731
    return fwd, bwd, flops


# The UNet's ResBlock convolutions with their adds: (C_in = C_out, H) at the UNet's three levels
ADD_SHAPES = [(32, 16), (64, 8), (128, 4)]


def add_rows(batch, quick, torch):
    """conv2d_add_forward (shift and residual in the store) against the convolution and two NumPy
    adds, and PyTorch's convolution and two adds: forward ms."""
    rows = []
    for c, h in ADD_SHAPES:
        rng = np.random.default_rng(0)
        x, res = rng.standard_normal((2, batch, c, h, h), dtype=np.float32)
        w = rng.standard_normal((c, c, 3, 3), dtype=np.float32) * 0.05
        b, shift = rng.standard_normal(c, dtype=np.float32), rng.standard_normal((batch, c), dtype=np.float32)
        fns = {"fused": lambda: _C.conv2d_add_forward(x, w, b, shift, res, 1, 1),
               "conv, then adds": lambda: _C.conv2d_forward(x, w, b, 1, 1) + shift[:, :, None, None] + res}
        if torch is not None:
            tx, tw, tb, ts, tr = (torch.from_numpy(a) for a in (x, w, b, shift, res))
            fns["torch"] = lambda: torch.nn.functional.conv2d(tx, tw, tb, padding=1) + ts[:, :, None, None] + tr
        times = {k: time_pass(f, quick) for k, f in fns.items()}
        rows.append([f"conv2d_add {c}->{c} {h}x{h}"] + [1e3 * times[k] for k in fns]
                    + [times["fused"] / times["conv, then adds"]]
                    + ([times["fused"] / times["torch"]] if torch is not None else []))
    return list(fns), rows


def time_pass(fn, quick):
    """Best time of fn; a single run when it is slow (the direct loops) or in --quick mode."""
    first = best_time(fn, repeat=1, warmup=0 if quick else 1)
    if quick or first > 0.5:
        return first
    return min(first, best_time(fn, repeat=5 if first > 0.05 else 10, warmup=0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 4, one run each")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--skip-direct", action="store_true", help="leave out the slow 'direct' version")
    args = parser.parse_args()
    batch = args.batch or (4 if args.quick else 64)
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    torch = load_torch(threads)
    versions = [v for v in _C.conv2d_versions() if not (args.skip_direct and v == "direct")]
    impls = ["numpy"] + versions + (["torch"] if torch is not None else [])
    fast = versions[0]

    print(f"# conv2d, batch {batch}, float32: {machine_line()}, {threads} threads")
    gemm_ref = matmul_gflops(512 if args.quick else 1024)
    print(f"NumPy float32 matmul: {gemm_ref:.0f} GFLOP/s"
          + (f"; PyTorch {torch.__version__} with {torch.get_num_threads()} threads" if torch else ""))

    header = ["shape", "uses"] + [f"{i} ms" for i in impls] + [f"{fast} fwd GFLOP/s", f"{fast} bwd GFLOP/s",
                                                              f"numpy/{fast}"]
    if torch is not None:
        header.append(f"{fast}/torch")
    rows, totals = [], dict.fromkeys(impls, 0.0)
    for name, uses, transposed, shape in SHAPES:
        times = {}
        for impl in impls:
            fwd, bwd, flops = make_passes(shape, transposed, batch, impl)
            t_fwd, t_bwd = time_pass(fwd, args.quick), time_pass(bwd, args.quick)
            times[impl] = (t_fwd, t_bwd)
            totals[impl] += uses * (t_fwd + t_bwd)
        f, bk = times[fast]
        row = [name, uses] + [1e3 * sum(times[i]) for i in impls]
        row += [flops / f / 1e9, 2 * flops / bk / 1e9, sum(times["numpy"]) / (f + bk)]
        if torch is not None:
            row.append((f + bk) / sum(times["torch"]))
        rows.append(row)
    total = ["**step total**", ""] + [1e3 * totals[i] for i in impls] + ["", "", totals["numpy"] / totals[fast]]
    if torch is not None:
        total.append(totals[fast] / totals["torch"])
    rows.append(total)
    print(markdown_table(header, rows))
    print(f"\n(ms = forward + backward; {fast}/torch < 1 means faster than PyTorch)")

    names, rows = add_rows(batch, args.quick, torch)
    print(f"\n# a UNet ResBlock's convolution + shift (B, C) + residual, forward, batch {batch}")
    print(markdown_table(["shape"] + [f"{n} ms" for n in names] + ["fused / conv, then adds"]
                         + (["fused / torch"] if torch is not None else []), rows))


if __name__ == "__main__":
    main()
