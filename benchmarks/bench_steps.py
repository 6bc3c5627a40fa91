"""Fused diffusion steps, GELU, batch norm (alone and with GELU), group norm with SiLU, Adam, the
Philox noise and the linear layers: the C++ kernels (tinydiff._C) vs the NumPy expression vs PyTorch.

    python benchmarks/bench_steps.py            # 1M-element float32 arrays, batch 64
    python benchmarks/bench_steps.py --quick    # a smoke test of seconds

Each step reads its inputs and writes its outputs once: "GB/s" counts exactly those bytes
(the per-sample coefficients are negligible), so it can be set beside the machine's own array
copy bandwidth (np.copyto on 1M elements, measured in the same run; bytes read + written).
The NumPy reference evaluates the same formula one operator at a time, a pass over memory each.
The row "adam step" is one Adam step over all parameters of the ContextUnet (n_feat 32, 10
classes): _C.adam_step, kernels.adam_step_ref, and torch.optim.Adam(...).step() (its defaults);
it reads p, g, m, v and writes p, m, v.
The linear layers (forward, dx, dw: linear_forward, linear_backward_input, linear_backward_weight)
are compute-bound, so their table counts GFLOP/s instead.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_time, copy_gbs, load_torch, machine_line, markdown_table  # noqa: E402

from tinydiff import _C, kernels  # noqa: E402


def cases(shape, dtype):
    """name -> (arrays read + written, {impl: closure})"""
    rng = np.random.default_rng(0)
    b = shape[0]
    xt, eps, z, unc, x0 = (rng.standard_normal(shape, dtype=dtype) for _ in range(5))
    c = [rng.uniform(0.1, 1.0, b).astype(dtype) for _ in range(5)]
    w, bias_, inv_std = (rng.uniform(0.5, 2.0, shape[1]).astype(dtype) for _ in range(3))   # per channel
    pool_d, pool_idx = _C.max_pool2d_forward(xt, (2, 2), (2, 2), 0)   # a dout and its window offsets
    _, gn_mean, gn_inv_std = _C.group_norm_silu_forward(xt, 2, w, bias_, 1e-5, True)   # (B, 2) each
    key, counter = np.array([1, 2], np.uint32), np.array([5, 0, 0, 0], np.uint32)   # a Philox state
    out = {
        "q_sample": (3, {"C++": lambda: _C.q_sample(x0, eps, c[0], c[1]),
                         "numpy": lambda: kernels.q_sample_ref(x0, eps, c[0], c[1])}),
        "ddpm_step": (4, {"C++": lambda: _C.ddpm_step(xt, eps, z, c[0], c[1], c[2]),
                          "numpy": lambda: kernels.ddpm_step_ref(xt, eps, z, c[0], c[1], c[2])}),
        "ddpm_step + CFG": (5, {"C++": lambda: _C.ddpm_step(xt, eps, z, c[0], c[1], c[2], unc, 3.0),
                                "numpy": lambda: kernels.ddpm_step_ref(xt, eps, z, c[0], c[1], c[2], unc, 3.0)}),
        "ddim_step (clip)": (5, {"C++": lambda: _C.ddim_step(xt, eps, z, *c, True),
                                 "numpy": lambda: kernels.ddim_step_ref(xt, eps, z, *c, True)}),
        "ddim_step + CFG": (6, {"C++": lambda: _C.ddim_step(xt, eps, z, *c, False, unc, 3.0),
                                "numpy": lambda: kernels.ddim_step_ref(xt, eps, z, *c, False, unc, 3.0)}),
        "gelu forward": (2, {"C++": lambda: _C.gelu_forward(xt), "numpy": lambda: kernels.gelu_forward_ref(xt)}),
        "gelu backward": (3, {"C++": lambda: _C.gelu_backward(eps, xt),
                              "numpy": lambda: kernels.gelu_backward_ref(eps, xt)}),
        # training mode over the channels of xt: reads x, writes out and xhat; reads dout, xhat, writes dx
        "batch_norm forward": (3, {"C++": lambda: _C.batch_norm_forward_train(xt, w, bias_, 1e-5),
                                   "numpy": lambda: kernels.batch_norm_forward_train_ref(xt, w, bias_, 1e-5)}),
        "batch_norm backward": (3, {"C++": lambda: _C.batch_norm_backward_train(eps, x0, inv_std, w),
                                    "numpy": lambda: kernels.batch_norm_backward_train_ref(eps, x0, inv_std, w)}),
        # gelu(batch norm) in one kernel: the same bytes as batch norm alone
        "batch_norm + gelu forward": (3, {
            "C++": lambda: _C.batch_norm_gelu_forward_train(xt, w, bias_, 1e-5),
            "numpy": lambda: kernels.batch_norm_gelu_forward_train_ref(xt, w, bias_, 1e-5)}),
        "batch_norm + gelu backward": (3, {
            "C++": lambda: _C.batch_norm_gelu_backward_train(eps, x0, inv_std, w, bias_),
            "numpy": lambda: kernels.batch_norm_gelu_backward_train_ref(eps, x0, inv_std, w, bias_)}),
        # 2x2 windows at stride 2 (the ContextUnet's MaxPool2d): reads x, writes out and idx (8 bytes)
        "max_pool2d forward": (0.75, {"C++": lambda: _C.max_pool2d_forward(xt, (2, 2), (2, 2), 0),
                                      "numpy": lambda: kernels.max_pool2d_forward_ref(xt, (2, 2), (2, 2), 0)}),
        "max_pool2d backward": (1.5, {
            "C++": lambda: _C.max_pool2d_backward(pool_d, pool_idx, shape[2:], (2, 2), (2, 2), 0),
            "numpy": lambda: kernels.max_pool2d_backward_ref(pool_d, pool_idx, shape[2:], (2, 2), (2, 2), 0)}),
        "batch_norm + gelu eval": (2, {"C++": lambda: _C.batch_norm_gelu_forward_eval(xt, w, bias_),
                                       "numpy": lambda: kernels.batch_norm_gelu_forward_eval_ref(xt, w, bias_)}),
        # silu(group norm), 2 groups, in one kernel: reads x, writes out; reads dout and x, writes dx
        "group_norm + silu forward": (2, {
            "C++": lambda: _C.group_norm_silu_forward(xt, 2, w, bias_, 1e-5, True),
            "numpy": lambda: kernels.group_norm_silu_forward_ref(xt, 2, w, bias_, 1e-5, True)}),
        "group_norm + silu backward": (3, {
            "C++": lambda: _C.group_norm_silu_backward(eps, xt, gn_mean, gn_inv_std, 2, w, bias_, True),
            "numpy": lambda: kernels.group_norm_silu_backward_ref(eps, xt, gn_mean, gn_inv_std, 2, w, bias_, True)}),
        # the noise (tinydiff.philox): xt.size words (4 bytes each), or as many normals, written once
        "philox_uint32": (4 / np.dtype(dtype).itemsize, {
            "C++": lambda: _C.philox_uint32(key, counter, xt.size),
            "numpy": lambda: kernels.philox_uint32_ref(key, counter, xt.size)}),
        "philox_normal": (1, {"C++": lambda: _C.philox_normal(key, counter, xt.size, dtype),
                              "numpy": lambda: kernels.philox_normal_ref(key, counter, xt.size, dtype)}),
    }
    torch = load_torch(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    if torch is not None:
        t_xt, t_eps, t_z, t_unc, t_x0 = (torch.from_numpy(a) for a in (xt, eps, z, unc, x0))
        tc = [torch.from_numpy(a).view(-1, *([1] * (len(shape) - 1))) for a in c]
        ddim = lambda e, clip: ((t_xt - tc[1] * e) / tc[0]).clamp(-1, 1) if clip else (t_xt - tc[1] * e) / tc[0]  # noqa: E731
        cfg = lambda: t_unc + 3.0 * (t_eps - t_unc)                                        # noqa: E731
        out["q_sample"][1]["torch"] = lambda: tc[0] * t_x0 + tc[1] * t_eps
        out["ddpm_step"][1]["torch"] = lambda: tc[0] * (t_xt - tc[1] * t_eps) + tc[2] * t_z
        out["ddpm_step + CFG"][1]["torch"] = lambda: tc[0] * (t_xt - tc[1] * cfg()) + tc[2] * t_z
        out["ddim_step (clip)"][1]["torch"] = lambda: tc[2] * ddim(t_eps, True) + tc[3] * t_eps + tc[4] * t_z
        out["ddim_step + CFG"][1]["torch"] = lambda: (lambda e: tc[2] * ddim(e, False) + tc[3] * e + tc[4] * t_z)(cfg())
        out["philox_normal"][1]["torch"] = lambda: torch.randn(shape, dtype=t_xt.dtype)    # PyTorch's Mersenne Twister
        out["gelu forward"][1]["torch"] = lambda: torch.nn.functional.gelu(t_xt)
        out["gelu backward"][1]["torch"] = lambda: torch.ops.aten.gelu_backward(t_eps, t_xt)
        t_w, t_b = torch.from_numpy(w), torch.from_numpy(bias_)
        _, t_mean, t_rstd = torch.ops.aten.native_batch_norm(t_xt, t_w, t_b, None, None, True, 0.1, 1e-5)
        out["batch_norm forward"][1]["torch"] = lambda: torch.ops.aten.native_batch_norm(
            t_xt, t_w, t_b, None, None, True, 0.1, 1e-5)
        out["batch_norm backward"][1]["torch"] = lambda: torch.ops.aten.native_batch_norm_backward(
            t_eps, t_xt, t_w, None, None, t_mean, t_rstd, True, 1e-5, [True, True, True])
        out["batch_norm + gelu forward"][1]["torch"] = lambda: torch.nn.functional.gelu(torch.ops.aten.native_batch_norm(
            t_xt, t_w, t_b, None, None, True, 0.1, 1e-5)[0])      # eager: two kernels
        t_pool, t_pool_idx = torch.nn.functional.max_pool2d(t_xt, 2, return_indices=True)
        out["max_pool2d forward"][1]["torch"] = lambda: torch.nn.functional.max_pool2d(t_xt, 2, return_indices=True)
        out["max_pool2d backward"][1]["torch"] = lambda: torch.ops.aten.max_pool2d_with_indices_backward(
            t_pool, t_xt, [2, 2], [2, 2], [0, 0], [1, 1], False, t_pool_idx)
        t_y = torch.ops.aten.native_batch_norm(t_xt, t_w, t_b, None, None, True, 0.1, 1e-5)[0]
        out["batch_norm + gelu backward"][1]["torch"] = lambda: torch.ops.aten.native_batch_norm_backward(
            torch.ops.aten.gelu_backward(t_eps, t_y), t_xt, t_w, None, None, t_mean, t_rstd, True, 1e-5,
            [True, True, True])
        out["group_norm + silu forward"][1]["torch"] = lambda: torch.nn.functional.silu(   # eager: two kernels
            torch.ops.aten.native_group_norm(t_xt, t_w, t_b, b, shape[1], t_xt[0, 0].numel(), 2, 1e-5)[0])
        t_gn_y, t_gn_mean, t_gn_rstd = torch.ops.aten.native_group_norm(t_xt, t_w, t_b, b, shape[1],
                                                                         t_xt[0, 0].numel(), 2, 1e-5)
        out["group_norm + silu backward"][1]["torch"] = lambda: torch.ops.aten.native_group_norm_backward(
            torch.ops.aten.silu_backward(t_eps, t_gn_y), t_xt, t_gn_mean, t_gn_rstd, t_w, b, shape[1],
            t_xt[0, 0].numel(), 2, [True, True, True])
        out["batch_norm + gelu eval"][1]["torch"] = lambda: torch.nn.functional.gelu(
            t_xt * t_w.view(1, -1, *([1] * (len(shape) - 2))) + t_b.view(1, -1, *([1] * (len(shape) - 2))))
    return out, torch


def adam_case(dtype, torch):
    """(arrays read + written, numel, {impl: closure}) for one Adam step over the ContextUnet's
    parameters (n_feat 32, 10 classes, as the quick start trains)."""
    from tinydiff.models import ContextUnet
    model = ContextUnet(in_channels=1, n_feat=32, n_cfeat=10, height=16)
    rng = np.random.default_rng(0)
    p = [t.data.astype(dtype) for t in model.parameters()]
    g = [rng.standard_normal(a.shape).astype(dtype) for a in p]
    m = [np.zeros_like(a) for a in p]
    v = [np.zeros_like(a) for a in p]
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1)               # lr, betas, eps, weight decay, Adam, t
    fns = {"C++": lambda: _C.adam_step(p, g, m, v, *hyper),        # in place
           "numpy": lambda: kernels.adam_step_ref(p, g, m, v, *hyper)}
    if torch is not None:
        tparams = [torch.tensor(a.copy(), requires_grad=True) for a in p]
        for t, a in zip(tparams, g):
            t.grad = torch.from_numpy(a)
        fns["torch"] = torch.optim.Adam(tparams, lr=1e-3).step
    return 7, sum(a.size for a in p), fns


# Linear layers: (rows N, in I, out O). The UNet's attention projections at 4x4 (batch 100 x 16 tokens,
# 128 channels), the same at the training batch (64 x 16), and its time-embedding MLP (batch 100).
LINEAR_SHAPES = [(1600, 128, 128), (1024, 128, 128), (100, 128, 512)]


def linear_cases(dtype, torch):
    """name -> (multiply-adds, {impl: closure}): _C.linear_forward / _backward_input / _backward_weight,
    the reference (NumPy's matmul, BLAS with its own threads) and PyTorch."""
    rng = np.random.default_rng(1)
    out = {}
    for n, i, o in LINEAR_SHAPES:
        x, w, b, dout = (rng.standard_normal(s).astype(dtype) for s in [(n, i), (o, i), (o,), (n, o)])
        name = f"linear {n}x{i} -> {o}"
        out[name + " forward"] = {"C++": lambda x=x, w=w, b=b: _C.linear_forward(x, w, b),
                                  "numpy": lambda x=x, w=w, b=b: kernels.linear_forward_ref(x, w, b)}
        out[name + " dx"] = {"C++": lambda d=dout, w=w: _C.linear_backward_input(d, w),
                             "numpy": lambda d=dout, w=w: kernels.linear_backward_input_ref(d, w)}
        out[name + " dw"] = {"C++": lambda d=dout, x=x: _C.linear_backward_weight(d, x),
                             "numpy": lambda d=dout, x=x: kernels.linear_backward_weight_ref(d, x)}
        if torch is not None:
            tx, tw, tb, td = (torch.from_numpy(a) for a in (x, w, b, dout))
            out[name + " forward"]["torch"] = lambda tx=tx, tw=tw, tb=tb: torch.nn.functional.linear(tx, tw, tb)
            out[name + " dx"]["torch"] = lambda td=td, tw=tw: td @ tw
            out[name + " dw"]["torch"] = lambda td=td, tx=tx: td.T @ tx
        for key in ("forward", "dx", "dw"):
            out[f"{name} {key}"] = (n * i * o, out[f"{name} {key}"])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    shape = (64, 4, 64, 64)                                   # 1,048,576 elements, 64 samples
    numel = int(np.prod(shape))
    repeat, number = (5, 1) if args.quick else (60, 1)    # the best single call: least disturbed
    copy = copy_gbs(numel, dtype, repeat=repeat * 2)
    table, torch = cases(shape, dtype)
    impls = ["numpy", "C++"] + (["torch"] if torch is not None else [])
    print(f"# fused steps, {numel} {dtype.name} elements (batch {shape[0]}): {machine_line()}, "
          f"{os.environ.get('OMP_NUM_THREADS', os.cpu_count())} threads")
    print(f"array copy (np.copyto): {copy:.1f} GB/s" + (f"; PyTorch {torch.__version__}" if torch else ""))
    header = ["kernel"] + [f"{i} ms" for i in impls] + [f"{i} GB/s" for i in impls] + ["C++ % of copy", "numpy/C++"]
    rows = []
    table = {name: (arrays, numel, fns) for name, (arrays, fns) in table.items()}
    table["adam step"] = adam_case(dtype, torch)
    for name, (arrays, n, fns) in table.items():
        times = {i: best_time(fns[i], repeat=repeat, number=number) for i in impls if i in fns}
        gbs = {i: arrays * n * dtype.itemsize / t / 1e9 for i, t in times.items()}
        rows.append([name] + [1e3 * times[i] if i in times else "-" for i in impls] + [gbs.get(i, "-") for i in impls]
                    + [f"{100 * gbs['C++'] / copy:.0f}%", times["numpy"] / times["C++"]])
    print(markdown_table(header, rows))
    print(f"adam step: {table['adam step'][1]} {dtype.name} parameters (the ContextUnet, n_feat 32)")

    rows = []
    for name, (macs, fns) in linear_cases(dtype, torch).items():
        times = {i: best_time(fns[i], repeat=repeat, number=number) for i in impls if i in fns}
        rows.append([name] + [1e3 * times[i] for i in impls] + [2 * macs / times[i] / 1e9 for i in impls]
                    + [times["numpy"] / times["C++"]] + ([times["torch"] / times["C++"]] if torch else []))
    print(f"\n# linear layers, {dtype.name} (GFLOP/s counts 2 N I O per pass; numpy: its BLAS threads)")
    print(markdown_table(["pass"] + [f"{i} ms" for i in impls] + [f"{i} GFLOP/s" for i in impls] + ["numpy/C++"]
                         + (["torch/C++"] if torch else []), rows))


if __name__ == "__main__":
    main()
