"""The training step and the denoising forward of tinydiff's models, side by side with PyTorch.

    python benchmarks/bench_train_step.py                 # every model, both passes, this machine's ISA
    python benchmarks/bench_train_step.py --isa avx2      # PyTorch and NumPy's BLAS capped to AVX2
    python benchmarks/bench_train_step.py --quick         # smoke run: small batches, 1 timed round

Rows (one subprocess per model, so that each has the machine to itself):
  ContextUnet n_feat 32 and 64, 10 classes   (the course's model; the quick start trains n_feat 32)
  UNet channels (32, 64, 128), 10 classes    (GroupNorm, SiLU, attention at 4x4)
Passes:
  train     loss = mse(model(x_t, t, c), eps); zero_grad; backward; Adam      batch 64
  denoise   model(x_t, t, c) in eval mode under no_grad, the sampler's call     batch 100, 200 (guidance)
In each subprocess tinydiff and PyTorch (the test suite's twin of the model, tests/test_models.py)
run interleaved, one call of each per round, with the same thread count (--threads, default 2:
OpenMP for us, torch.set_num_threads for PyTorch); the time is the median over the rounds, so
that a slow moment of the machine falls on both. tinydiff runs each call inside
backend.one_blas_thread(), as its training loop and samplers do.

--isa avx2 on an AVX-512 machine measures what an AVX2 laptop gets: it requires tinydiff._C built
with TINYDIFF_ARCH=avx2, and caps PyTorch (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2,
MKL_ENABLE_INSTRUCTIONS=AVX2) and OpenBLAS (OPENBLAS_CORETYPE=Haswell) to the same instructions.
Run it on an otherwise idle machine: any other load ruins a 2-thread timing.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from common import machine_line  # noqa: E402

NUM_CLASSES = 10
MODELS = {   # row name -> (model, constructor arguments identical in tinydiff and the PyTorch twin)
    "ContextUnet n_feat 32": ("ContextUnet", dict(in_channels=1, n_feat=32, n_cfeat=NUM_CLASSES, height=16)),
    "ContextUnet n_feat 64": ("ContextUnet", dict(in_channels=1, n_feat=64, n_cfeat=NUM_CLASSES, height=16)),
    "UNet (32, 64, 128)": ("UNet", dict(in_channels=1, channels=(32, 64, 128), num_classes=NUM_CLASSES)),
}
# The instruction-set caps: environment variables read by PyTorch (ATen's dispatch, oneDNN, MKL)
# and OpenBLAS when they load, so they are set before the worker starts.
ISA_CAPS = {
    "native": {},
    "avx2": dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2",
                 OPENBLAS_CORETYPE="Haswell"),
    "avx512": dict(ATEN_CPU_CAPABILITY="avx512", ONEDNN_MAX_CPU_ISA="AVX512_CORE", MKL_ENABLE_INSTRUCTIONS="AVX512",
                   OPENBLAS_CORETYPE="SkylakeX"),
}


def inputs(kind, b, seed=0):
    """x_t (B, 1, 16, 16), eps, and the model's own t and c conventions (tinydiff and torch alike)."""
    rng = np.random.default_rng(seed)
    xt = rng.standard_normal((b, 1, 16, 16)).astype(np.float32)
    eps = rng.standard_normal((b, 1, 16, 16)).astype(np.float32)
    step = rng.integers(1, 500, b)
    if kind == "ContextUnet":                                    # (t+1) / T and one-hot context vectors
        return xt, eps, (step / 500).astype(np.float32)[:, None], np.eye(NUM_CLASSES, dtype=np.float32)[step % 10]
    return xt, eps, step, step % (NUM_CLASSES + 1)               # timestep index and class (10 = null)


def tinydiff_calls(kind, kw, train_batch, denoise_batches):
    """{pass name: a function that runs it once} for tinydiff."""
    sys.path.insert(0, ROOT)
    from tinydiff import F, Tensor, backend, no_grad
    from tinydiff.models import ContextUnet, UNet
    from tinydiff.optim import Adam
    backend.manual_seed(0)
    model = ContextUnet(**kw) if kind == "ContextUnet" else UNet(**kw)
    opt = Adam(model.parameters(), lr=1e-3)
    xt, eps, t, c = inputs(kind, train_batch)
    xt, eps = Tensor(xt), Tensor(eps)

    def train():
        with backend.one_blas_thread():
            loss = F.mse_loss(model(xt, t, c), eps)
            opt.zero_grad()
            loss.backward()
            opt.step()

    calls = {"train": train}
    sampler_model = (ContextUnet(**kw) if kind == "ContextUnet" else UNet(**kw)).eval()   # as the samplers run it
    for b in denoise_batches:
        x, _, tb, cb = inputs(kind, b, seed=1)
        x = Tensor(x)

        def denoise(x=x, tb=tb, cb=cb):
            with backend.one_blas_thread(), no_grad():
                sampler_model(x, tb, cb)
        calls[f"denoise {b}"] = denoise
    return calls


def torch_calls(kind, kw, train_batch, denoise_batches, threads):
    """The same for the PyTorch twin."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_models import torch_context_unet, torch_unet    # the twins the tests check
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = (torch_context_unet(torch, **kw) if kind == "ContextUnet"
             else torch_unet(torch, kw["in_channels"], kw["channels"], kw["num_classes"]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, eps, t, c = (torch.from_numpy(np.asarray(a)) for a in inputs(kind, train_batch))

    def train():
        loss = torch.nn.functional.mse_loss(model(xt, t, c), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()

    calls = {"train": train}
    sampler_model = (torch_context_unet(torch, **kw) if kind == "ContextUnet"
                     else torch_unet(torch, kw["in_channels"], kw["channels"], kw["num_classes"])).eval()
    for b in denoise_batches:
        x, _, tb, cb = (torch.from_numpy(np.asarray(a)) for a in inputs(kind, b, seed=1))

        def denoise(x=x, tb=tb, cb=cb):
            with torch.no_grad():
                sampler_model(x, tb, cb)
        calls[f"denoise {b}"] = denoise
    return calls


def worker(row, args):
    """Runs in the subprocess: build both, warm up, time interleaved rounds; print one JSON line."""
    kind, kw = MODELS[row]
    denoise_batches = [int(b) for b in args.denoise_batches.split(",")]
    sides = {"tinydiff": tinydiff_calls(kind, kw, args.batch, denoise_batches)}
    if importlib.util.find_spec("torch") is not None:
        sides["torch"] = torch_calls(kind, kw, args.batch, denoise_batches, args.threads)
    times = {side: {name: [] for name in calls} for side, calls in sides.items()}
    for name in sides["tinydiff"]:
        for calls in sides.values():                             # warm-up: allocations, caches
            calls[name]()
        for _ in range(args.rounds):
            for side, calls in sides.items():
                start = time.perf_counter()
                calls[name]()
                times[side][name].append(time.perf_counter() - start)
    result = {side: {name: 1000 * float(np.median(t)) for name, t in per.items()} for side, per in times.items()}
    from tinydiff import backend
    result["build"] = backend.native.build_info() if backend.native is not None else {"isa": "not built"}
    if "torch" in sides:
        import torch
        result["torch_isa"] = torch.backends.cpu.get_cpu_capability()
    print(json.dumps(result))


def run(row, args):
    """One model in a fresh interpreter with the ISA caps; returns its JSON result or {'error': why}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               **ISA_CAPS[args.isa])
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", row, "--batch", str(args.batch),
           "--rounds", str(args.rounds), "--threads", str(args.threads), "--denoise-batches", args.denoise_batches]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": ((proc.stderr.strip().splitlines() or ["failed"])[-1])[:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", choices=list(ISA_CAPS), default="native",
                        help="cap PyTorch and OpenBLAS to this ISA (native: no cap); tinydiff._C must be built for it")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, denoise 4, one round")
    parser.add_argument("--batch", type=int, default=64, help="training batch")
    parser.add_argument("--denoise-batches", default="100,200", help="batches of the denoising forward")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.denoise_batches, args.rounds = 4, "4", 1
    if args.worker:
        return worker(args.worker, args)

    print(f"{machine_line()}; CPU ISA {cpu_flags()}; --isa {args.isa}; {args.threads} threads; "
          f"median of {args.rounds} interleaved rounds")
    header = False
    for row in MODELS:
        r = run(row, args)
        if "error" in r:
            print(f"| {row} | - | - | - | - | {r['error']} |")
            continue
        if not header:
            print(f"tinydiff._C: {r['build']}; PyTorch: {r.get('torch_isa', 'not installed')}\n")
            print("| model | pass | batch | tinydiff ms | PyTorch ms | tinydiff / PyTorch |")
            print("|---|---|---:|---:|---:|---:|")
            header = True
        if args.isa != "native" and r["build"]["isa"] != args.isa:
            print(f"(tinydiff._C is built for {r['build']['isa']}, not {args.isa}: "
                  f"rebuild with TINYDIFF_ARCH={args.isa} python setup.py build_ext --inplace --force)")
        for name, ms in r["tinydiff"].items():
            batch = args.batch if name == "train" else int(name.split()[1])
            theirs = r.get("torch", {}).get(name)
            ratio = f"**{ms / theirs:.2f}x**" if theirs else "-"
            print(f"| {row} | {name.split()[0]} | {batch} | {ms:.1f} | {theirs:.1f} | {ratio} |" if theirs else
                  f"| {row} | {name.split()[0]} | {batch} | {ms:.1f} | - | - |", flush=True)


if __name__ == "__main__":
    main()
