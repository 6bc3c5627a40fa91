"""Pictures: sample grids (PNG), denoising animations (GIF) and loss curves, written atomically.

    write_png("samples.png", image_grid(to_unit(x), ncol=10))    # x: (N, C, H, W) in [-1, 1]
    write_gif("denoising.gif", [image_grid(to_unit(xt), ncol=10) for xt in trajectory])
    write_loss_plot("loss.png", losses)

Every file goes through checkpoint.write_atomic (a temporary file, fsync, os.replace), so a
picture is either the old one or the new one, never half of one.
"""
import io

import numpy as np

from tinydiff.checkpoint import write_atomic


def to_unit(x):
    """Model space [-1, 1] -> image space [0, 1], clipped."""
    return np.clip((np.asarray(x, dtype=np.float32) + 1) / 2, 0, 1)


def image_grid(images, ncol, pad=1, scale=4):
    """(N, C, H, W) in [0, 1] -> (rows, cols, 3) uint8: ncol images a row, white gaps, each pixel
    drawn scale x scale so that 16x16 images are big enough to see."""
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    canvas = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top:top + h, left:left + w] = img.transpose(1, 2, 0) if c == 3 else img[0][..., None]
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return (canvas * 255 + 0.5).astype(np.uint8)


def write_png(path, rgb):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def write_gif(path, frames, duration_ms=80):
    """frames: a list of (rows, cols, 3) uint8 pictures; the last one is held for a second."""
    from PIL import Image
    pictures = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    pictures[0].save(buf, format="GIF", save_all=True, append_images=pictures[1:] + [pictures[-1]] * 12,
                     duration=duration_ms, loop=0)
    write_atomic(path, buf.getvalue())


def write_loss_plot(path, losses):
    """The loss per step (light) and its trailing mean over k steps, on a log scale."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    if len(losses):
        steps = np.arange(1, len(losses) + 1)
        k = max(1, min(50, len(losses) // 10))
        total = np.cumsum(np.append(0.0, losses))
        smooth = (total[k:] - total[:-k]) / k                          # mean of steps i-k+1 .. i
        smooth = np.concatenate([total[1:k] / np.arange(1, k), smooth])   # shorter means at the start
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        ax.plot(steps, smooth, color="tab:blue", label=f"mean of {k} steps")
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())
