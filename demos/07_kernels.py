"""Kernels: the same training step with the NumPy reference, the C++ kernels and the CUDA kernels.

    python demos/07_kernels.py                   # CPU: NumPy reference vs C++ (about a minute)
    python demos/07_kernels.py --device cuda     # adds the GPU: CuPy reference vs CUDA kernels
    python demos/07_kernels.py --tiny            # seconds: a small model and batch

tinydiff's hot paths (convolutions and their two backward passes, GELU, the fused diffusion
updates) exist three times: NumPy reference code in tinydiff/kernels.py (the specification),
C++ with OpenMP in csrc/*_cpu.cpp (tinydiff._C), and CUDA in csrc/*.cu (tinydiff._C_cuda).
`tinydiff.set_kernels("numpy" | "native")` picks the reference or the compiled ones; where the
arrays live (NumPy: CPU, CuPy: GPU) picks C++ or CUDA. The same switch is `--kernels` on
`tinydiff train`, or TINYDIFF_KERNELS=numpy in the environment.

This demo runs ONE training step of the default ContextUnet, the same weights, batch, timesteps
and noise each time (DDPM Alg. 1: q_sample, forward, MSE, backward, Adam), for each available
implementation; it times the forward and backward passes (median of REPEATS), and checks that the
loss and every gradient agree with the CPU NumPy reference (float32: expect differences ~1e-6
of the largest gradient).

Writes (in --out): kernels.md (the table, also printed) and kernels.png (time per step).
"""
import argparse
import os
import platform
import time

import numpy as np

import tinydiff
from tinydiff import backend, data, optim
from tinydiff.diffusion import NoiseSchedule, training_loss
from tinydiff.models import ContextUnet

N_FEAT = 64                 # the default model's width
BATCH = 64                  # the default batch size
REPEATS = 3                 # timed steps per implementation (after one warm-up step)
SEED = 0


def one_step(model, schedule, x0, context, t, eps, opt):
    """DDPM Alg. 1 once; returns (loss, forward seconds, backward seconds). The arrays live on the
    model's device; the GPU is synchronised before each clock reading."""
    sync = (lambda: backend.cupy_module().cuda.Device().synchronize()) if model.out[3].weight.device == "cuda" else (lambda: None)
    sync()
    with backend.one_blas_thread(model.out[3].weight.device):   # as the training loop runs a step
        start = time.perf_counter()
        loss = training_loss(model, schedule, x0, context, "eps", t=t, eps=eps)   # q_sample + forward + MSE
        sync()
        mid = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
    return loss.item(), mid - start, time.perf_counter() - mid


def main(argv=None):
    parser = argparse.ArgumentParser(description="One training step, timed with each kernel implementation.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="out/07_kernels", help="folder for the table and picture")
    parser.add_argument("--tiny", action="store_true", help="n_feat 8, batch 8, one repeat (seconds)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    n_feat, batch, repeats = (8, 8, 1) if args.tiny else (N_FEAT, BATCH, REPEATS)

    # the same inputs for everyone: a batch of digits, its labels, timesteps and noise
    images, labels, k = data.load_digits("train")
    rng = np.random.default_rng(SEED)
    idx = rng.choice(len(images), batch, replace=False)
    x0, y = images[idx], labels[idx]                                    # (B, 1, 16, 16), (B,)
    schedule = NoiseSchedule("linear", 500)
    t = rng.integers(0, schedule.T, size=batch)                         # (B,)
    eps = rng.standard_normal(x0.shape).astype(np.float32)              # (B, 1, 16, 16)
    tinydiff.manual_seed(SEED)
    initial = {name: v.numpy().copy() for name, v in ContextUnet(1, n_feat, k).state_dict().items()}

    runs = [("cpu", "numpy", "NumPy reference (CPU)")]
    if backend.native is not None:
        runs.append(("cpu", "native", "C++ kernels (tinydiff._C, OpenMP)"))
    else:
        print(f"skipping the C++ kernels: {backend.native_error}")
    if args.device == "cuda":
        runs.append(("cuda", "numpy", "CuPy reference (GPU)"))
        if backend.cuda_kernels() is not None:
            runs.append(("cuda", "native", "CUDA kernels (tinydiff._C_cuda)"))
        else:
            print(f"skipping the CUDA kernels: {backend.cuda_available(reason=True)[1]}")

    results, reference = [], None
    for device, kernels, name in runs:
        tinydiff.set_kernels(kernels)
        model = ContextUnet(1, n_feat, k)
        model.load_state_dict(initial)
        model.to(device).train()
        opt = optim.Adam(model.parameters(), lr=1e-3)
        x0_dev, y_dev, t_dev, eps_dev = [backend.to_device(a, device) for a in (x0, y, t, eps)]
        inputs = [x0_dev, model.context(y_dev), t_dev, eps_dev]            # the model's context: (B, 10) one-hot
        loss, _, _ = one_step(model, schedule, *inputs, opt)            # warm-up; gradients to compare
        grads = {n: backend.to_device(p.grad, "cpu") for n, p in model.named_parameters()}
        times = [one_step(model, schedule, *inputs, opt)[1:] for _ in range(repeats)]
        forward, backward = np.median([f for f, _ in times]), np.median([b for _, b in times])
        if reference is None:
            reference = (loss, grads)
        loss_diff = abs(loss - reference[0])
        # the largest gradient difference, relative to the largest gradient (a per-tensor ratio would
        # divide round-off by round-off: a conv bias before BatchNorm has a gradient of exactly 0 in theory)
        grad_diff = (max(float(np.abs(g - reference[1][n]).max()) for n, g in grads.items())
                     / max(float(np.abs(g).max()) for g in reference[1].values()))
        results.append((name, forward, backward, loss, loss_diff, grad_diff))
        print(f"{name:36s} forward {1000 * forward:8.1f} ms  backward+Adam {1000 * backward:8.1f} ms  "
              f"loss {loss:.6f}  grad diff {grad_diff:.1e}")
    tinydiff.set_kernels("native" if backend.native is not None else "numpy")

    # --- the table and the picture -----------------------------------------------------------------
    base = results[0][1] + results[0][2]
    lines = [f"One training step of ContextUnet(n_feat={n_feat}), batch {batch}, 16x16 digits; median of "
             f"{repeats}; {platform.machine()} with {os.cpu_count()} CPU cores"
             + (f", GPU {backend.cupy_module().cuda.runtime.getDeviceProperties(0)['name'].decode()}"
                if args.device == "cuda" else "") + ".",
             "",
             "| implementation | forward (ms) | backward + Adam (ms) | step (ms) | speed-up | loss | grad diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, f, b, loss, _, grad_diff in results:
        lines.append(f"| {name} | {1000 * f:.1f} | {1000 * b:.1f} | {1000 * (f + b):.1f} | {base / (f + b):.1f}x | "
                     f"{loss:.6f} | {grad_diff:.1e} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "kernels.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print("\n" + text)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(results) + 1.2))
    names = [r[0] for r in results]
    ax.barh(names, [1000 * r[1] for r in results], label="forward")
    ax.barh(names, [1000 * r[2] for r in results], left=[1000 * r[1] for r in results], label="backward + Adam")
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step")
    ax.set_title(f"one training step, ContextUnet n_feat {n_feat}, batch {batch}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "kernels.png"), dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}/kernels.md and {args.out}/kernels.png")
    return results


if __name__ == "__main__":
    main()
