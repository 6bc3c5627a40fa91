"""Time one training step (forward + backward + Adam) of both U-Nets, tinydiff against PyTorch.

    python benchmarks/bench_train_step.py            # batch 64, 16x16x1 images, 5 timed steps
    python benchmarks/bench_train_step.py --quick    # smoke run: batch 4, 1 timed step

Each row runs in its own subprocess, so that its peak memory (getrusage's max RSS) is its own:
  tinydiff, kernels="numpy"   the NumPy reference kernels
  tinydiff, kernels="native"  the compiled C++ kernels (tinydiff._C), where built
  torch                       PyTorch CPU on the identical architecture (the test's twins), if installed
All use --threads threads (default 2: OMP/BLAS for tinydiff, torch.set_num_threads for PyTorch);
the native rows run NumPy's BLAS on one thread, as tinydiff's training loop does (backend.one_blas_thread).
The step is the same everywhere: loss = mse(model(x_t, t, c), eps); zero_grad; backward; Adam.
Time is the median over the timed steps after one warm-up step. "vs torch" = time / torch's time.
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {   # name -> constructor arguments (identical in tinydiff and the PyTorch twin)
    "ContextUnet": dict(in_channels=1, n_feat=64, n_cfeat=5, height=16),
    "UNet": dict(in_channels=1, channels=(32, 64, 128), num_classes=5),
}
IMPLS = ["tinydiff-numpy", "tinydiff-native", "torch"]


def batch(model_name, b, seed=0):
    """x_t (B, 1, 16, 16), eps, and the model's own t and c conventions."""
    rng = np.random.default_rng(seed)
    xt = rng.standard_normal((b, 1, 16, 16)).astype(np.float32)
    eps = rng.standard_normal((b, 1, 16, 16)).astype(np.float32)
    step = rng.integers(1, 500, b)
    if model_name == "ContextUnet":                              # t / T and one-hot context vectors
        return xt, eps, (step / 500).astype(np.float32)[:, None], np.eye(5, dtype=np.float32)[step % 5]
    return xt, eps, step, step % 6                               # timestep index and class (5 = null)


def peak_rss_mb():
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec; getrusage's
    ru_maxrss would carry over the parent's peak, so it is only the fallback (other systems)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def worker(model_name, impl, b, steps):
    """Runs in the subprocess: build, warm up, time; print one JSON line."""
    xt, eps, t, c = batch(model_name, b)
    if impl == "torch":
        import torch
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from test_models import torch_context_unet, torch_unet    # the twins the tests check
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        base = peak_rss_mb()                                     # after the imports
        torch.manual_seed(0)
        kw = MODELS[model_name]
        model = (torch_context_unet(torch, **kw) if model_name == "ContextUnet"
                 else torch_unet(torch, kw["in_channels"], kw["channels"], kw["num_classes"]))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        xt, eps, t, c = (torch.from_numpy(np.asarray(a)) for a in (xt, eps, t, c))

        def step():
            loss = torch.nn.functional.mse_loss(model(xt, t, c), eps)
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        sys.path.insert(0, ROOT)
        import tinydiff
        from tinydiff import F, Tensor, backend
        from tinydiff.models import ContextUnet, UNet
        from tinydiff.optim import Adam
        tinydiff.set_kernels(impl.split("-")[1])
        base = peak_rss_mb()                                     # after the imports
        tinydiff.manual_seed(0)
        model = ContextUnet(**MODELS[model_name]) if model_name == "ContextUnet" else UNet(**MODELS[model_name])
        opt = Adam(model.parameters(), lr=1e-3)
        xt, eps = Tensor(xt), Tensor(eps)

        def step():
            with backend.one_blas_thread():      # as tinydiff's training loop runs a step
                loss = F.mse_loss(model(xt, t, c), eps)
                opt.zero_grad()
                loss.backward()
                opt.step()

    step()                                                       # warm-up (allocations, caches)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"ms": 1000 * float(np.median(times)), "peak_mb": peak_rss_mb(),
                      "model_mb": peak_rss_mb() - base}))


def run(model_name, impl, b, steps, threads):
    """One configuration in a fresh interpreter; returns its JSON result or {'error': why}."""
    # OpenBLAS takes OMP_NUM_THREADS too; OPENBLAS_NUM_THREADS is left unset, as it would turn
    # tinydiff's one_blas_thread off
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model_name, impl,
           "--batch", str(b), "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": last[:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available(impl):
    """Whether to try a row; the parent imports neither torch nor tinydiff (a worker that cannot
    run, e.g. native kernels not built, reports its error in the table)."""
    return impl != "torch" or importlib.util.find_spec("torch") is not None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, one timed step")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps = 4, 1
    if args.worker:
        return worker(*args.worker, args.batch, args.steps)

    print(f"Training step (forward + backward + Adam), batch {args.batch}, 16x16x1 images, "
          f"{args.threads} threads, median of {args.steps} steps\n")
    print("| model | implementation | ms / step | vs torch | peak RSS MB | growth after imports MB |")
    print("|---|---|---:|---:|---:|---:|")
    for model_name in MODELS:
        results = {impl: run(model_name, impl, args.batch, args.steps, args.threads) if available(impl)
                   else {"error": "not available"} for impl in IMPLS}
        ref = results["torch"].get("ms")
        for impl, r in results.items():
            if "error" in r:
                print(f"| {model_name} | {impl} | - | - | - | {r['error']} |")
                continue
            ratio = f"{r['ms'] / ref:.2f}x" if ref else "-"
            print(f"| {model_name} | {impl} | {r['ms']:.1f} | {ratio} | {r['peak_mb']:.0f} | {r['model_mb']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
