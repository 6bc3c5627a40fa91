"""A modern U-Net noise predictor, for better samples than the course's ContextUnet.

What changes from the course model, and why (Ho et al. 2020, arXiv:2006.11239, Appendix B;
Nichol & Dhariwal 2021, arXiv:2102.09672):
  - GroupNorm instead of BatchNorm: no batch statistics, so training and sampling behave alike.
  - SiLU activations and residual blocks everywhere, each with a learned 1x1 skip when widths differ.
  - Time enters as a sinusoidal embedding of the integer timestep (as positions in a Transformer),
    then an MLP; every residual block adds its own projection of it.
  - The class enters as a learned embedding added to the time embedding. Index `num_classes` is the
    null class, the "no label" input of classifier-free guidance (arXiv:2207.12598).
  - Self-attention at the lowest resolution lets every position see every other.

    x (B, C, H, W) -conv-> (B, c0, H, W)
      level 0: ResBlock -> skip0 -> down (stride-2 conv) -> (B, c0, H/2, W/2)
      level 1: ResBlock -> skip1 -> down ...             (widths `channels` = (c0, c1, c2, ...))
      last level: ResBlock -> skip_last (no down-sampling)
      middle: ResBlock, Attention, ResBlock
      up, from the last level: ResBlock(cat(h, skip_i)) -> up (nearest x2 + conv) ...
      -> GroupNorm, SiLU, conv -> (B, C, H, W)
"""
import math

import numpy as np

from tinydiff import backend, nn
from tinydiff import functional as F
from tinydiff.arrays import as_array, as_labels
from tinydiff.tensor import Tensor, cat


def timestep_embedding(t, dim):
    """Sinusoidal embedding of timesteps t (B,) into (B, dim): [sin(t f_k), cos(t f_k)],
    frequencies f_k = 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1 (Transformer positions; DDPM App. B)."""
    xp = backend.get_array_module(t)
    half = dim // 2
    freqs = xp.exp(-math.log(10000.0) * xp.arange(half, dtype=np.float64) / half)   # (dim/2,)
    args = t.astype(np.float64)[:, None] * freqs[None, :]                             # (B, dim/2)
    return xp.concatenate([xp.sin(args), xp.cos(args)], axis=1)                       # (B, dim)


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))) + proj(SiLU(emb));  out = skip(x) + conv(SiLU(GN(h)))."""

    def __init__(self, in_ch, out_ch, emb_dim, groups=8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):                                   # (B, in, H, W), (B, E)
        h = self.conv1(F.silu(self.norm1(x)))                    # (B, out, H, W)
        e = self.emb_proj(F.silu(emb))                           # (B, out)
        h = h + e.view(e.shape[0], e.shape[1], 1, 1)             # (B, out, H, W): time/class shift per channel
        h = self.conv2(F.silu(self.norm2(h)))                    # (B, out, H, W)
        return self.skip(x) + h                                  # (B, out, H, W)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions: softmax(q k^T / sqrt(d)) v, plus a residual."""

    def __init__(self, ch, heads=4, groups=8):
        super().__init__()
        if ch % heads:
            raise ValueError(f"Attention: {ch} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.q, self.k, self.v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.proj = nn.Linear(ch, ch)

    def forward(self, x):                                        # (B, C, H, W)
        b, c, h, w = x.shape
        nh, d = self.heads, c // self.heads
        tokens = self.norm(x).view(b, c, h * w).permute(0, 2, 1)   # (B, HW, C)

        def split(y):                                            # (B, HW, C) -> (B, nh, HW, d)
            return y.view(b, h * w, nh, d).permute(0, 2, 1, 3)

        q, k, v = split(self.q(tokens)), split(self.k(tokens)), split(self.v(tokens))
        att = F.softmax((q @ k.transpose(2, 3)) * (1.0 / math.sqrt(d)), dim=-1)   # (B, nh, HW, HW)
        y = (att @ v).permute(0, 2, 1, 3).reshape(b, h * w, c)  # (B, HW, C)
        y = self.proj(y).permute(0, 2, 1).view(b, c, h, w)      # (B, C, H, W)
        return x + y


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 1)

    def forward(self, x):                                        # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, 1, 1)

    def forward(self, x):                                        # (B, in, H, W) -> (B, out, 2H, 2W)
        return self.conv(F.upsample_nearest2d(x, 2))


class UNet(nn.Module):
    """Noise predictor eps_theta(x_t, t, c) with GroupNorm, SiLU, attention and class embeddings.

    forward(x, t, c=None):
        x  (B, in_channels, H, W) noisy images x_t; H and W divisible by 2^(len(channels) - 1)
        t  the timestep INDEX (integers 0..T-1, floats allowed), one per sample: any shape with
           B elements, or a single value for the whole batch.         time_input(t, T) gives it.
        c  (B,) integer class labels in [0, num_classes]; `num_classes` is the null class
           (unconditional). None means the null class. null_context(B) gives it.
           With num_classes=None the model is unconditional and c must be None.
    returns (B, in_channels, H, W) the predicted noise.

    The conditioning seam (as the ContextUnet's; the callers use only these):
        context(labels)     class labels (B,) -> the same labels, int64 on the model's device
        null_context(B)     the null class `num_classes` for every sample (None: unconditional)
        time_input(t, T)    timestep indices t (B,) -> t itself, as Ho's and diffusers' U-Nets take
    """

    def __init__(self, in_channels=1, channels=(32, 64, 128), num_classes=None, height=16,
                 heads=4, groups=8):
        super().__init__()
        step = 2 ** (len(channels) - 1)
        if height % step:
            raise ValueError(f"UNet: height {height} must be divisible by {step} for {len(channels)} levels")
        self.in_channels, self.channels, self.num_classes, self.height = in_channels, tuple(channels), num_classes, height
        self.config = dict(in_channels=in_channels, channels=list(channels), num_classes=num_classes,
                           height=height, heads=heads, groups=groups)
        c0, emb = channels[0], 4 * channels[0]

        self.time_mlp = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))   # (B, c0) -> (B, E)
        if num_classes is not None:
            self.class_emb = nn.Embedding(num_classes + 1, emb)  # row num_classes: the null class
        self.init_conv = nn.Conv2d(in_channels, c0, 3, 1, 1)

        self.down_blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        prev = c0
        for i, ch in enumerate(channels):
            self.down_blocks.append(ResBlock(prev, ch, emb, groups))
            if i < len(channels) - 1:
                self.downs.append(Downsample(ch))
            prev = ch

        self.mid1 = ResBlock(prev, prev, emb, groups)
        self.mid_attn = Attention(prev, heads, groups)
        self.mid2 = ResBlock(prev, prev, emb, groups)

        self.up_blocks, self.ups = nn.ModuleList(), nn.ModuleList()   # ordered from the lowest level up
        for i in reversed(range(len(channels))):
            self.up_blocks.append(ResBlock(prev + channels[i], channels[i], emb, groups))
            if i > 0:
                self.ups.append(Upsample(channels[i], channels[i - 1]))
            prev = channels[i - 1] if i > 0 else channels[0]

        self.out = nn.Sequential(nn.GroupNorm(groups, c0), nn.SiLU(), nn.Conv2d(c0, in_channels, 3, 1, 1))

    # --- the conditioning seam -----------------------------------------------------------------
    def context(self, labels):
        """Class labels (B,) integers in [0, num_classes) -> int64 (B,) on the model's device, checked;
        None -> None (forward then uses the null class)."""
        if labels is None:
            return None
        if self.num_classes is None:
            raise ValueError("UNet.context: this model has no classes (num_classes=None): pass labels=None")
        return as_labels(labels, self.num_classes, self.init_conv.weight.device, "UNet.context")

    def null_context(self, batch):
        """The unconditional context: the null class index for every sample (None if unconditional)."""
        if self.num_classes is None:
            return None
        return self.init_conv.weight.xp.full(batch, self.num_classes, dtype=np.int64)

    def time_input(self, t, T):
        """Timestep indices t (B,) in 0..T-1 -> the indices themselves (the sinusoidal embedding's input)."""
        return Tensor(t)

    def forward(self, x, t, c=None):
        t, c = self._check_inputs(x, t, c)
        b = x.shape[0]
        temb = timestep_embedding(t, self.channels[0]).astype(x.dtype)     # (B or 1, c0)
        emb = self.time_mlp(Tensor(temb))                                   # (B or 1, E)
        if self.num_classes is not None:
            emb = emb + self.class_emb(c)                                   # (B, E)
        if emb.shape[0] != b:
            emb = emb.expand(b, emb.shape[1])                               # one t for the whole batch

        h = self.init_conv(x)                                    # (B, c0, H, W)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)                                    # (B, c_i, H/2^i, W/2^i)
            skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)                             # (B, c_i, H/2^(i+1), W/2^(i+1))

        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)     # (B, c_last, h_low, w_low)

        for j, block in enumerate(self.up_blocks):
            h = block(cat((h, skips.pop()), 1), emb)             # (B, c_i, ., .)
            if j < len(self.ups):
                h = self.ups[j](h)                               # (B, c_(i-1), 2., 2.)
        return self.out(h)                                       # (B, C, H, W)

    def _check_inputs(self, x, t, c):
        """Refuse misshapen input with a message naming the shapes; t and c become raw index arrays."""
        step = 2 ** (len(self.channels) - 1)
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != self.in_channels \
                or x.shape[2] % step or x.shape[3] % step:
            raise ValueError(f"UNet: x must be a Tensor of shape (B, {self.in_channels}, H, W) with H, W "
                             f"divisible by {step}, got {getattr(x, 'shape', type(x).__name__)}")
        b = x.shape[0]
        t = as_array(t, x.device).reshape(-1)
        if t.size not in (1, b):
            raise ValueError(f"UNet: t must hold one timestep per sample ({b}) or one in all, got shape {t.shape}")
        if self.num_classes is None:
            if c is not None:
                raise ValueError("UNet: this model has no classes (num_classes=None), so c must be None")
            return t, None
        c = self.null_context(b) if c is None else c
        c = as_array(c, x.device)
        if c.shape != (b,) or c.dtype.kind not in "iu":
            raise ValueError(f"UNet: c must be ({b},) integer class labels in [0, {self.num_classes}], "
                             f"got shape {c.shape} dtype {c.dtype}")
        if c.size and (int(c.min()) < 0 or int(c.max()) > self.num_classes):
            raise ValueError(f"UNet: class labels must lie in [0, {self.num_classes}] ({self.num_classes} is "
                             f"the null class), got min {int(c.min())} max {int(c.max())}")
        return t, c
