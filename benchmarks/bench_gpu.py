"""GPU benchmarks: each CUDA kernel version next to cuDNN and CuPy, a training step, DDIM sampling.

    python benchmarks/bench_gpu.py                        # everything, batch 256
    python benchmarks/bench_gpu.py --only conv,steps      # conv | steps | gelu | philox | train | sample
    python benchmarks/bench_gpu.py --quick --json out.json

Needs CuPy and a GPU (pip install -e ".[gpu]"), and tinydiff._C_cuda (TINYDIFF_CUDA=1 pip install -e .).
cuDNN is reached through PyTorch if a CUDA build of it is installed (TF32 off: a float32 comparison),
else through CuPy's cuDNN binding if cuDNN is there; otherwise its column says why not.
What is measured (times are medians, with the whole device synchronised after each call, so they
include the binding's checks, CuPy's allocation of the output and the launch):
  conv    the ContextUnet's convolutions at batch 256 (course sizes: 3x16x16 images, n_feat 64),
          forward / backward input / backward weight, every version of tinydiff._C_cuda, GFLOP/s
          (2 * N * O * OH * OW * C * kh * kw per pass), next to cuDNN: target within 2x (aim 1.2x).
  steps   q_sample, ddpm_step, ddim_step (fused, guided) in GB/s (bytes read + written once),
          next to the same expression in CuPy (kernels.*_ref) and a device copy's GB/s:
          target 80% of the copy's bandwidth on the large arrays.
  gelu    forward and backward, GB/s, next to CuPy's erf expression.
  philox  philox_uint32 and philox_normal (tinydiff.philox's noise), GB/s written, next to CuPy's generator.
  train   one ContextUnet training step (loss, backward, Adam) at batch 256, images per second.
  sample  DDIM with 25 steps for 1000 16x16 images: images per second (target: 1000 in < 1 s on an H100).
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table  # noqa: E402

import tinydiff  # noqa: E402
from tinydiff import backend, kernels  # noqa: E402

PARTS = ("conv", "steps", "gelu", "philox", "train", "sample")

# The ContextUnet's convolutions (n_feat 64, 3 channels, 16x16), as (name, C, H, O, k, stride, padding,
# transposed); H is the input size. Transposed convs run as conv2d_backward_input (see functional.py).
CONV_LAYERS = [
    ("init 3->64 @16", 3, 16, 64, 3, 1, 1, False),
    ("64->64 @16", 64, 16, 64, 3, 1, 1, False),
    ("64->128 @8", 64, 8, 128, 3, 1, 1, False),
    ("128->128 @8", 128, 8, 128, 3, 1, 1, False),
    ("64->64 @8", 64, 8, 64, 3, 1, 1, False),
    ("out 128->64 @16", 128, 16, 64, 3, 1, 1, False),
    ("out 64->3 @16", 64, 16, 3, 3, 1, 1, False),
    ("up0 T 128->128 4x4 s4 @1", 128, 1, 128, 4, 4, 0, True),
    ("up1 T 256->64 2x2 s2 @4", 256, 4, 64, 2, 2, 0, True),
    ("up2 T 128->64 2x2 s2 @8", 128, 8, 64, 2, 2, 0, True),
]


def device_time(cp, fn, repeat=20, warmup=3):
    """Median seconds per call of fn(), synchronising the whole device after each call."""
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_torch_cudnn():
    """torch with CUDA (cuDNN, TF32 off, autotuned), or (None, why not)."""
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return None, f"PyTorch {torch.__version__} has no CUDA"
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    return torch, ""


def cudnn_conv(cp, torch):
    """The three passes through cuDNN, on CuPy arrays: a dict pass -> fn(a, b, shape, s, p), or None."""
    if torch is not None:
        tt = lambda a: torch.as_tensor(a, device="cuda")          # zero-copy, via __cuda_array_interface__
        return {
            "forward": lambda x, w, _, s, p: torch.nn.functional.conv2d(tt(x), tt(w), None, s, p),
            "backward_input": lambda dout, w, hw, s, p: torch.nn.grad.conv2d_input(
                (dout.shape[0], w.shape[1]) + tuple(hw), tt(w), tt(dout), s, p),
            "backward_weight": lambda dout, x, khw, s, p: torch.nn.grad.conv2d_weight(
                tt(x), (dout.shape[1], x.shape[1]) + tuple(khw), tt(dout), s, p),
        }
    try:
        from cupy import cudnn
    except Exception:                                             # no cuDNN library: ImportError and others
        return None

    def forward(x, w, _, s, p):
        o, _, kh, kw = w.shape
        y = cp.empty((x.shape[0], o, (x.shape[2] + 2 * p - kh) // s + 1, (x.shape[3] + 2 * p - kw) // s + 1), x.dtype)
        cudnn.convolution_forward(x, w, None, y, (p, p), (s, s), (1, 1), 1, auto_tune=True, tensor_core="never")
        return y
    return {"forward": forward}


def conv_arrays(cp, layer, n):
    """x, w and dout of one layer, as the pass of the kernels API sees them, and its FLOPs."""
    _, c, h, o, k, s, p, transposed = layer
    rng = cp.random.default_rng(0)
    if transposed:            # conv_transpose2d(x (N, C, H, H), w (C, O, k, k)) = backward_input of a conv
        hout = (h - 1) * s - 2 * p + k
        x = rng.standard_normal((n, o, hout, hout), dtype=cp.float32)     # the conv's input
        w = rng.standard_normal((c, o, k, k), dtype=cp.float32)
        dout = rng.standard_normal((n, c, h, h), dtype=cp.float32)        # the conv's output
    else:
        oh = (h + 2 * p - k) // s + 1
        x = rng.standard_normal((n, c, h, h), dtype=cp.float32)
        w = rng.standard_normal((o, c, k, k), dtype=cp.float32)
        dout = rng.standard_normal((n, o, oh, oh), dtype=cp.float32)
    flops = 2 * dout.size * w.shape[1] * k * k
    return x, w, dout, flops


def bench_conv(cp, cuda, n, repeat):
    torch, why = load_torch_cudnn()
    ref = cudnn_conv(cp, torch)
    versions = cuda.conv2d_versions()
    header = ["layer", "pass"] + [f"{v} GFLOP/s" for v in versions] + ["cuDNN GFLOP/s", "best / cuDNN time", "max rel err"]
    rows, records = [], []
    for layer in CONV_LAYERS:
        x, w, dout, flops = conv_arrays(cp, layer, n)
        s, p = layer[5], layer[6]
        calls = {   # pass -> (our call(version), cuDNN call)
            "forward": (lambda v: cuda.conv2d_forward(x, w, None, s, p, version=v),
                        ref and "forward" in ref and (lambda: ref["forward"](x, w, None, s, p))),
            "backward_input": (lambda v: cuda.conv2d_backward_input(dout, w, x.shape[2:], s, p, version=v),
                               ref and "backward_input" in ref and (lambda: ref["backward_input"](dout, w, x.shape[2:], s, p))),
            "backward_weight": (lambda v: cuda.conv2d_backward_weight(dout, x, w.shape[2:], s, p, version=v),
                                ref and "backward_weight" in ref and (lambda: ref["backward_weight"](dout, x, w.shape[2:], s, p))),
        }
        for pass_, (ours, theirs) in calls.items():
            times = {v: device_time(cp, lambda: ours(v), repeat) for v in versions}
            t_ref = device_time(cp, theirs, repeat) if theirs else None
            want = cp.asarray(theirs()) if theirs else ours(versions[-1])   # else: the simplest version
            err = max(float(cp.abs(ours(v) - want).max() / (cp.abs(want).max() + 1e-30)) for v in versions)
            best = min(times.values())
            rows.append([layer[0], pass_] + [flops / times[v] / 1e9 for v in versions]
                        + [flops / t_ref / 1e9 if t_ref else f"n/a ({why or 'no cuDNN'})",
                           best / t_ref if t_ref else "n/a", err])
            records.append(dict(layer=layer[0], pass_=pass_, flops=flops, seconds=times, cudnn_seconds=t_ref,
                                max_rel_err=err))
    print(f"\n## Convolution, batch {n}, float32 (cuDNN: {'PyTorch ' + torch.__version__ if torch else why or 'CuPy'})\n")
    print(markdown_table(header, rows))
    return records


def bench_steps(cp, cuda, shapes, repeat):
    rows, records = [], []
    for shape in shapes:
        rng = cp.random.default_rng(1)
        b = shape[0]
        xt, eps, z, eps_u = (rng.standard_normal(shape, dtype=cp.float32) for _ in range(4))
        c = [rng.uniform(0.1, 1.0, b).astype(cp.float32) for _ in range(5)]
        nbytes = xt.nbytes
        dst = cp.empty_like(xt)
        t_copy = device_time(cp, lambda: cp.copyto(dst, xt), repeat)
        copy_gbs = 2 * nbytes / t_copy / 1e9
        steps = {   # name -> (ours, CuPy's unfused expression, arrays moved)
            "q_sample": (lambda: cuda.q_sample(xt, eps, c[0], c[1]),
                         lambda: kernels.q_sample_ref(xt, eps, c[0], c[1]), 3),
            "ddpm_step": (lambda: cuda.ddpm_step(xt, eps, z, c[0], c[1], c[2]),
                          lambda: kernels.ddpm_step_ref(xt, eps, z, c[0], c[1], c[2]), 4),
            "ddpm_step guided": (lambda: cuda.ddpm_step(xt, eps, z, c[0], c[1], c[2], eps_u, 3.0),
                                 lambda: kernels.ddpm_step_ref(xt, eps, z, c[0], c[1], c[2], eps_u, 3.0), 5),
            "ddim_step": (lambda: cuda.ddim_step(xt, eps, z, *c),
                          lambda: kernels.ddim_step_ref(xt, eps, z, *c), 5),
            "ddim_step guided, clipped": (lambda: cuda.ddim_step(xt, eps, z, *c, True, eps_u, 3.0),
                                          lambda: kernels.ddim_step_ref(xt, eps, z, *c, True, eps_u, 3.0), 6),
        }
        for name, (ours, cupy_expr, arrays) in steps.items():
            t, t_cupy = device_time(cp, ours, repeat), device_time(cp, cupy_expr, repeat)
            gbs = arrays * nbytes / t / 1e9
            rows.append([name, "x".join(map(str, shape)), t * 1e6, gbs, arrays * nbytes / t_cupy / 1e9, copy_gbs,
                         f"{100 * gbs / copy_gbs:.0f}%"])
            records.append(dict(step=name, shape=shape, seconds=t, cupy_seconds=t_cupy, bytes=arrays * nbytes,
                                copy_gbs=copy_gbs))
    print("\n## Fused diffusion steps, float32\n")
    print(markdown_table(["step", "shape", "us", "GB/s", "CuPy GB/s", "copy GB/s", "of copy"], rows))
    return records


def bench_gelu(cp, cuda, shapes, repeat):
    try:
        from cupyx.scipy.special import erf
    except ImportError:
        erf = None
    rows, records = [], []
    for shape in shapes:
        x = cp.random.default_rng(2).standard_normal(shape, dtype=cp.float32)
        dout = cp.ones_like(x)
        half, r2 = cp.float32(0.5), cp.float32(0.5 ** 0.5)
        cases = {
            "gelu_forward": (lambda: cuda.gelu_forward(x), erf and (lambda: half * x * (1 + erf(x * r2))), 2),
            "gelu_backward": (lambda: cuda.gelu_backward(dout, x), None, 3),
        }
        for name, (ours, cupy_expr, arrays) in cases.items():
            t = device_time(cp, ours, repeat)
            t_cupy = device_time(cp, cupy_expr, repeat) if cupy_expr else None
            rows.append([name, "x".join(map(str, shape)), t * 1e6, arrays * x.nbytes / t / 1e9,
                         arrays * x.nbytes / t_cupy / 1e9 if t_cupy else "n/a"])
            records.append(dict(op=name, shape=shape, seconds=t, cupy_seconds=t_cupy, bytes=arrays * x.nbytes))
    print("\n## GELU, float32\n")
    print(markdown_table(["op", "shape", "us", "GB/s", "CuPy erf expression GB/s"], rows))
    return records


def bench_philox(cp, cuda, shapes, repeat):
    key, counter = np.array([1, 2], np.uint32), np.array([5, 0, 0, 0], np.uint32)
    rows, records = [], []
    for shape in shapes:
        n = int(np.prod(shape))
        rng = cp.random.default_rng(0)
        cases = {"philox_uint32": (lambda: cuda.philox_uint32(key, counter, n), None),
                 "philox_normal": (lambda: cuda.philox_normal(key, counter, n, np.float32),
                                   lambda: rng.standard_normal(n, dtype=cp.float32))}
        for name, (ours, cupy_gen) in cases.items():
            t = device_time(cp, ours, repeat)
            t_cupy = device_time(cp, cupy_gen, repeat) if cupy_gen else None
            rows.append([name, n, t * 1e6, 4 * n / t / 1e9, 4 * n / t_cupy / 1e9 if t_cupy else "n/a"])
            records.append(dict(op=name, n=n, seconds=t, cupy_seconds=t_cupy, bytes=4 * n))
    print("\n## Philox noise, float32 / uint32\n")
    print(markdown_table(["op", "n", "us", "GB/s", "CuPy generator GB/s"], rows))
    return records


def course_model():
    """The course's ContextUnet on the GPU, its schedule, or (None, why not)."""
    try:
        from tinydiff.context_unet import ContextUnet
        from tinydiff.diffusion import NoiseSchedule
    except ImportError as err:
        return None, None, f"not yet available ({err})"
    tinydiff.manual_seed(0)
    return ContextUnet(3, n_feat=64, n_cfeat=5, height=16).to("cuda"), NoiseSchedule(timesteps=500), ""


def bench_train(cp, n, repeat):
    model, schedule, why = course_model()
    if model is None:
        print(f"\n## Training step: {why}")
        return {"skipped": why}
    from tinydiff import optim
    from tinydiff.diffusion import training_loss
    rng = cp.random.default_rng(3)
    x0 = rng.uniform(-1, 1, (n, 3, 16, 16)).astype(cp.float32)
    context = cp.eye(5, dtype=cp.float32)[rng.integers(0, 5, n)]
    opt = optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        loss = training_loss(model, schedule, x0, context, context_drop=0.1)
        loss.backward()
        opt.step()
    rows, records = [], []
    for kernel_choice in ("native", "numpy"):
        tinydiff.set_kernels(kernel_choice)
        t = device_time(cp, step, repeat=max(3, repeat // 4), warmup=2)
        rows.append([kernel_choice, n, t * 1e3, n / t])
        records.append(dict(kernels=kernel_choice, batch=n, seconds=t))
    tinydiff.set_kernels("native")
    print("\n## ContextUnet training step (loss, backward, Adam), float32\n")
    print(markdown_table(["kernels", "batch", "ms / step", "images / s"], rows))
    return records


def bench_sample(cp, count, repeat):
    model, schedule, why = course_model()
    if model is None:
        print(f"\n## DDIM-25 sampling: {why}")
        return {"skipped": why}
    from tinydiff.samplers import ddim_sample
    model.eval()
    context = cp.eye(5, dtype=cp.float32)[cp.arange(count) % 5]
    sample = lambda: ddim_sample(model, schedule, (count, 3, 16, 16), context, steps=25, device="cuda")
    t = device_time(cp, sample, repeat=max(2, repeat // 8), warmup=1)
    print("\n## DDIM-25 sampling, float32\n")
    print(markdown_table(["images", "seconds", "images / s", "target"],
                         [[count, t, count / t, "1000 in < 1 s on an H100"]]))
    return dict(images=count, seconds=t)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller arrays: a smoke run")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    parts = args.only.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")

    ok, why = tinydiff.cuda_available(reason=True)
    if not ok:
        sys.exit(f"bench_gpu: no usable GPU: {why}")
    cp = backend.cupy_module()
    cuda = backend.cuda_kernels()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"# tinydiff GPU benchmarks: {gpu}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, "
          f"driver {cp.cuda.runtime.driverGetVersion()}, CuPy {cp.__version__}")
    repeat = 5 if args.quick else 20
    results = {"gpu": gpu, "cupy": cp.__version__}
    if cuda is None and {"conv", "steps", "gelu", "philox"} & set(parts):
        print(f"\ntinydiff._C_cuda is not built ({backend._cuda_ext_error}): no kernel benchmarks")
        parts = [p for p in parts if p in ("train", "sample")]
    step_shapes = [(args.batch, 3, 16, 16)] + ([] if args.quick else [(1024, 3, 128, 128)])
    if "conv" in parts:
        results["conv"] = bench_conv(cp, cuda, args.batch, repeat)
    if "steps" in parts:
        results["steps"] = bench_steps(cp, cuda, step_shapes, repeat)
    if "gelu" in parts:
        results["gelu"] = bench_gelu(cp, cuda, step_shapes, repeat)
    if "philox" in parts:
        results["philox"] = bench_philox(cp, cuda, step_shapes, repeat)
    if "train" in parts:
        results["train"] = bench_train(cp, args.batch, repeat)
    if "sample" in parts:
        results["sample"] = bench_sample(cp, 100 if args.quick else 1000, repeat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
