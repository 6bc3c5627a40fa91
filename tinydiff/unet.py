"""A modern U-Net noise predictor, for better samples than the course's ContextUnet.

What changes from the course model, and why (Ho et al. 2020, arXiv:2006.11239, Appendix B;
Nichol & Dhariwal 2021, arXiv:2102.09672):
  - GroupNorm instead of BatchNorm: no batch statistics, so training and sampling behave alike.
  - SiLU activations and residual blocks everywhere, each with a learned 1x1 skip when widths differ.
  - Time enters as a sinusoidal embedding of the integer timestep (as positions in a Transformer),
    then an MLP; every residual block adds its own projection of it.
  - The class enters as a learned embedding added to the time embedding. Index `num_classes` is the
    null class, the "no label" input of classifier-free guidance (arXiv:2207.12598).
  - Self-attention (at the levels in `attention_levels`, and in the middle) lets every position
    see every other.
  - With `context_dim`, cross-attention to the tokens of a prompt (Rombach et al. 2022,
    arXiv:2112.10752, Sec. 3.3) follows at the lower levels and in the middle, and the pooled
    prompt joins the time embedding (text_unet.py); without it the layout below is untouched.

The layout is the one diffusers' UNet2DModel builds (DownBlock2D / AttnDownBlock2D, UNetMidBlock2D,
UpBlock2D / AttnUpBlock2D), so that tinydiff/diffusers_bridge.py can move weights both ways:

    x (B, C, H, W) -init_conv-> h (B, c0, H, W)                                     skip
      level 0:  layers_per_block x [ResBlock (+ Attention)]                         skip each
                down (stride-2 conv, width kept) -> (B, c0, H/2, W/2)               skip
      level 1:  ... widths `channels` = (c0, c1, ...); the last level has no down
      middle:   ResBlock, Attention, ResBlock
      up, from the last level: layers_per_block + 1 x [ResBlock(cat(h, skip)) (+ Attention)],
                each taking the newest skip; then up (nearest x2 + conv, width kept)
      -> GroupNorm, SiLU, conv -> (B, C, H, W)

Every skip is used once: 1 + L*layers_per_block + (L-1) skips pushed, L*(layers_per_block+1) popped.
"""
import math

import numpy as np

from tinydiff import backend, nn
from tinydiff import functional as F
from tinydiff.arrays import as_array, as_labels
from tinydiff.tensor import Tensor, cat

LAYOUT = "unet2d"   # this module structure (diffusers' UNet2DModel); runs record it as "unet_layout"


def timestep_embedding(t, dim, flip_sin_to_cos=False, freq_shift=0):
    """Sinusoidal embedding of timesteps t (B,) into (B, dim): [sin(t f_k), cos(t f_k)] (or
    [cos, sin] with flip_sin_to_cos), f_k = 10000^(-k / (dim/2 - freq_shift)), k = 0 .. dim/2 - 1
    (Transformer positions; DDPM App. B). An odd dim gets one zero column at the end."""
    xp = backend.get_array_module(t)
    half = dim // 2
    freqs = xp.exp(-math.log(10000.0) * xp.arange(half, dtype=np.float64) / (half - freq_shift))  # (dim/2,)
    args = t.astype(np.float64)[:, None] * freqs[None, :]                             # (B, dim/2)
    parts = [xp.cos(args), xp.sin(args)] if flip_sin_to_cos else [xp.sin(args), xp.cos(args)]
    if dim % 2:
        parts.append(xp.zeros((len(t), 1)))
    return xp.concatenate(parts, axis=1)                                              # (B, dim)


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))) + proj(SiLU(emb));  out = skip(x) + conv(dropout(SiLU(GN(h))))."""

    def __init__(self, in_ch, out_ch, emb_dim, groups=8, eps=1e-5, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):                                   # (B, in, H, W), (B, E)
        e = self.emb_proj(F.silu(emb))                           # (B, out): time/class shift per channel
        # The two adds (+ e, + skip(x)) happen inside the convolutions' stores (F.conv2d_add).
        h = self.conv1(self.norm1(x, then_silu=True), shift=e)   # (B, out, H, W) = conv(SiLU(GN(x))) + e
        h = self.dropout(self.norm2(h, then_silu=True))
        return self.conv2(h, residual=self.skip(x))              # (B, out, H, W) = skip(x) + conv(h)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions: softmax(q k^T / sqrt(d)) v, plus a residual.
    head_dim d (None: one head of all `ch` channels); heads = ch / d."""

    def __init__(self, ch, head_dim=None, groups=8, eps=1e-5):
        super().__init__()
        head_dim = ch if head_dim is None else head_dim
        if ch % head_dim:
            raise ValueError(f"Attention: {ch} channels do not split into heads of {head_dim}")
        self.heads = ch // head_dim
        self.norm = nn.GroupNorm(groups, ch, eps)
        self.q, self.k, self.v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.proj = nn.Linear(ch, ch)

    def forward(self, x):                                        # (B, C, H, W)
        b, c, h, w = x.shape
        tokens = self.norm(x).view(b, c, h * w).permute(0, 2, 1)   # (B, HW, C)
        y = nn.multi_head_attention(self.q(tokens), self.k(tokens), self.v(tokens), self.heads)   # (B, HW, C)
        y = self.proj(y).permute(0, 2, 1).view(b, c, h, w)      # (B, C, H, W)
        return x + y


class CrossAttention(nn.Module):
    """The feature map attends to the text: queries from its H*W positions, keys and values from the
    text encoder's tokens, PAD tokens masked out; plus a residual (Rombach et al. 2022,
    arXiv:2112.10752, Sec. 3.3, "Conditioning Mechanisms"):
        Q = GN(x) W_q,  K = tokens W_k,  V = tokens W_v;   x + proj(softmax(Q K^T / sqrt(d)) V)
    `text` is the TextEncoder's (tokens (B, L, context_dim), key_padding_mask (B, L), pooled)."""

    def __init__(self, ch, context_dim, head_dim=None, groups=8, eps=1e-5):
        super().__init__()
        head_dim = ch if head_dim is None else head_dim
        if ch % head_dim:
            raise ValueError(f"CrossAttention: {ch} channels do not split into heads of {head_dim}")
        self.norm = nn.GroupNorm(groups, ch, eps)
        self.attn = nn.MultiheadAttention(ch, ch // head_dim, kdim=context_dim)

    def forward(self, x, text):                                  # (B, C, H, W), text as above
        tokens, key_padding_mask, _ = text
        b, c, h, w = x.shape
        queries = self.norm(x).view(b, c, h * w).permute(0, 2, 1)   # (B, HW, C)
        y = self.attn(queries, tokens, key_padding_mask)         # (B, HW, C): each position's mix of words
        return x + y.permute(0, 2, 1).view(b, c, h, w)           # (B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 1)

    def forward(self, x):                                        # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):                                        # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.upsample_nearest2d(x, 2))


class DownLevel(nn.Module):
    """One level on the way down: `layers` ResBlocks (each followed by Attention if `attention`, then
    CrossAttention to the text if `cross_dim`), then a Downsample unless it is the last level.
    Every output is kept as a skip."""

    def __init__(self, in_ch, out_ch, emb_dim, layers, attention, downsample, head_dim, groups, eps, dropout,
                 cross_dim=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(in_ch if j == 0 else out_ch, out_ch, emb_dim, groups, eps, dropout)
                                      for j in range(layers)])
        self.attentions = nn.ModuleList([Attention(out_ch, head_dim, groups, eps) for _ in range(layers)]
                                        if attention else [])
        self.cross_attentions = nn.ModuleList([CrossAttention(out_ch, cross_dim, head_dim, groups, eps)
                                               for _ in range(layers)] if cross_dim else [])
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(self, h, emb, skips, text=None):                 # (B, in, H, W) -> (B, out, H/2, W/2)
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, emb)                                   # (B, out, H, W)
            if len(self.attentions):
                h = self.attentions[j](h)
            if len(self.cross_attentions):
                h = self.cross_attentions[j](h, text)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)                               # (B, out, H/2, W/2)
            skips.append(h)
        return h


class UpLevel(nn.Module):
    """One level on the way up: `layers` ResBlocks, each on cat(h, newest skip) (then Attention if
    `attention`, then CrossAttention if `cross_dim`), and an Upsample unless it is the top level.
    skip_chs: the widths of the skips it takes, newest first."""

    def __init__(self, in_ch, out_ch, skip_chs, emb_dim, attention, upsample, head_dim, groups, eps, dropout,
                 cross_dim=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock((in_ch if j == 0 else out_ch) + s, out_ch, emb_dim, groups, eps, dropout)
                                      for j, s in enumerate(skip_chs)])
        self.attentions = nn.ModuleList([Attention(out_ch, head_dim, groups, eps) for _ in skip_chs]
                                        if attention else [])
        self.cross_attentions = nn.ModuleList([CrossAttention(out_ch, cross_dim, head_dim, groups, eps)
                                               for _ in skip_chs] if cross_dim else [])
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, h, emb, skips, text=None):                 # (B, in, H, W) -> (B, out, 2H, 2W)
        for j, resnet in enumerate(self.resnets):
            h = resnet(cat((h, skips.pop()), 1), emb)            # (B, out, H, W)
            if len(self.attentions):
                h = self.attentions[j](h)
            if len(self.cross_attentions):
                h = self.cross_attentions[j](h, text)
        if self.upsample is not None:
            h = self.upsample(h)                                 # (B, out, 2H, 2W)
        return h


class UNet(nn.Module):
    """Noise predictor eps_theta(x_t, t, c) with GroupNorm, SiLU, attention and class embeddings.

    UNet(in_channels=1, channels=(32, 64, 128), num_classes=None, height=16, layers_per_block=1,
         attention_levels=None, head_dim=None, groups=8, eps=1e-5, dropout=0.0,
         flip_sin_to_cos=True, freq_shift=0, context_dim=None, cross_attention_levels=None)
        attention_levels  one bool per level (None: attention at the last, lowest, level only);
                          the middle always has one Attention
        head_dim          channels per attention head (None: one head per Attention)
        flip_sin_to_cos, freq_shift   the time embedding's order and frequencies (see
                          timestep_embedding; the defaults are UNet2DModel's)
        context_dim       the width of text tokens to attend to (None: no text, the layout above).
                          Set, every (ResBlock, Attention) of the levels in cross_attention_levels
                          and the middle's Attention are followed by a CrossAttention, and the pooled
                          text, projected to the time embedding's width, is added to it
        cross_attention_levels  one bool per level (None: every level but the first, the full-size
                          one: for 16x16 images and 3 levels, 8x8 and 4x4)

    forward(x, t, c=None, text=None):
        x  (B, in_channels, H, W) noisy images x_t; H and W divisible by 2^(len(channels) - 1)
        t  the timestep INDEX (integers 0..T-1, floats allowed), one per sample: any shape with
           B elements, or a single value for the whole batch.         time_input(t, T) gives it.
        c  (B,) integer class labels in [0, num_classes]; `num_classes` is the null class
           (unconditional). None means the null class. null_context(B) gives it.
           With num_classes=None the model is unconditional and c must be None.
        text  with context_dim: the TextEncoder's (tokens (B, L, context_dim), key_padding_mask (B, L)
           bool, pooled (B, context_dim)); TextUNet (text_unet.py) passes it. Without: None.
    returns (B, in_channels, H, W) the predicted noise.

    The conditioning seam (as the ContextUnet's; the callers use only these):
        context(labels)     class labels (B,) -> the same labels, int64 on the model's device
        null_context(B)     the null class `num_classes` for every sample (None: unconditional)
        time_input(t, T)    timestep indices t (B,) -> t itself, as Ho's and diffusers' U-Nets take
    """

    def __init__(self, in_channels=1, channels=(32, 64, 128), num_classes=None, height=16, layers_per_block=1,
                 attention_levels=None, head_dim=None, groups=8, eps=1e-5, dropout=0.0,
                 flip_sin_to_cos=True, freq_shift=0, context_dim=None, cross_attention_levels=None):
        super().__init__()
        levels = len(channels)
        step = 2 ** (levels - 1)
        if height % step:
            raise ValueError(f"UNet: height {height} must be divisible by {step} for {levels} levels")
        attention_levels = [i == levels - 1 for i in range(levels)] if attention_levels is None else attention_levels
        if len(attention_levels) != levels:
            raise ValueError(f"UNet: attention_levels needs one entry per level ({levels}), got {attention_levels}")
        cross = [i > 0 for i in range(levels)] if cross_attention_levels is None else cross_attention_levels
        if len(cross) != levels:
            raise ValueError(f"UNet: cross_attention_levels needs one entry per level ({levels}), got {cross}")
        cross_dims = [context_dim if on else None for on in cross]      # per level: attend to text of this width
        self.in_channels, self.channels, self.num_classes, self.height = in_channels, tuple(channels), num_classes, height
        self.flip_sin_to_cos, self.freq_shift = bool(flip_sin_to_cos), freq_shift
        self.config = dict(in_channels=in_channels, channels=list(channels), num_classes=num_classes, height=height,
                           layers_per_block=layers_per_block, attention_levels=[bool(a) for a in attention_levels],
                           head_dim=head_dim, groups=groups, eps=eps, dropout=dropout,
                           flip_sin_to_cos=bool(flip_sin_to_cos), freq_shift=freq_shift)
        self.context_dim = context_dim
        if context_dim is not None:
            self.config.update(context_dim=context_dim, cross_attention_levels=[bool(a) for a in cross])
        c0, emb = channels[0], 4 * channels[0]
        common = dict(head_dim=head_dim, groups=groups, eps=eps, dropout=dropout)

        self.time_mlp = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))   # (B, c0) -> (B, E)
        if num_classes is not None:
            self.class_emb = nn.Embedding(num_classes + 1, emb)  # row num_classes: the null class
        if context_dim is not None:
            self.text_proj = nn.Linear(context_dim, emb)         # pooled text -> added to the time embedding
        self.init_conv = nn.Conv2d(in_channels, c0, 3, 1, 1)

        self.downs, skip_chs, prev = nn.ModuleList(), [c0], c0      # skip_chs: the width of every skip
        for i, ch in enumerate(channels):
            last = i == levels - 1
            self.downs.append(DownLevel(prev, ch, emb, layers_per_block, attention_levels[i], not last, **common,
                                        cross_dim=cross_dims[i]))
            skip_chs += [ch] * (layers_per_block + (not last))
            prev = ch

        self.mid1 = ResBlock(prev, prev, emb, groups, eps, dropout)
        self.mid_attn = Attention(prev, head_dim, groups, eps)
        if context_dim is not None:
            self.mid_cross = CrossAttention(prev, context_dim, head_dim, groups, eps)
        self.mid2 = ResBlock(prev, prev, emb, groups, eps, dropout)

        self.ups = nn.ModuleList()                                   # ordered from the lowest level up
        for i in reversed(range(levels)):
            takes = [skip_chs.pop() for _ in range(layers_per_block + 1)]   # newest first, as forward pops
            self.ups.append(UpLevel(prev, channels[i], takes, emb, attention_levels[i], i > 0, **common,
                                    cross_dim=cross_dims[i]))
            prev = channels[i]

        self.out = nn.Sequential(nn.GroupNorm(groups, c0, eps), nn.SiLU(), nn.Conv2d(c0, in_channels, 3, 1, 1))

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

    def forward(self, x, t, c=None, text=None):
        t, c = self._check_inputs(x, t, c)
        self._check_text(x, text)
        b = x.shape[0]
        temb = timestep_embedding(t, self.channels[0], self.flip_sin_to_cos, self.freq_shift)  # (B or 1, c0)
        emb = self.time_mlp(Tensor(temb.astype(x.dtype)))                   # (B or 1, E)
        if self.num_classes is not None:
            emb = emb + self.class_emb(c)                                   # (B, E)
        if text is not None:
            emb = emb + self.text_proj(text[2])                             # (B, E): the pooled prompt
        if emb.shape[0] != b:
            emb = emb.expand(b, emb.shape[1])                               # one t for the whole batch

        h = self.init_conv(x)                                    # (B, c0, H, W)
        skips = [h]
        for level in self.downs:
            h = level(h, emb, skips, text)                       # (B, c_i, H/2^(i+1), ...), skips pushed
        h = self.mid_attn(self.mid1(h, emb))                     # (B, c_last, h_low, w_low)
        if text is not None:
            h = self.mid_cross(h, text)
        h = self.mid2(h, emb)
        for level in self.ups:
            h = level(h, emb, skips, text)                       # (B, c_i, 2., 2.), skips popped
        norm, _, conv = self.out                                 # self.out(h), with GroupNorm and SiLU as one op
        return conv(norm(h, then_silu=True))                     # (B, C, H, W)

    def _check_text(self, x, text):
        """text is the TextEncoder's (tokens (B, L, context_dim), mask (B, L), pooled (B, context_dim))
        exactly when the model has a context_dim."""
        if self.context_dim is None:
            if text is not None:
                raise ValueError("UNet: this model has no cross-attention (context_dim=None), so text must be None")
            return
        b, d = x.shape[0], self.context_dim
        triple = isinstance(text, tuple) and len(text) == 3
        tokens, mask, pooled = (getattr(part, "shape", None) for part in text) if triple else (None, None, None)
        if tokens is None or len(tokens) != 3 or (tokens[0], tokens[2]) != (b, d) or mask != tokens[:2] \
                or pooled != (b, d):
            got = (tokens, mask, pooled) if triple else type(text).__name__
            raise ValueError(f"UNet: text must be the text encoder's (tokens ({b}, L, {d}), key_padding_mask "
                             f"({b}, L), pooled ({b}, {d})), got {got}")

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
