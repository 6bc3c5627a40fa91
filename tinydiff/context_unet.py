"""The course's ContextUnet ("How Diffusion Models Work", DeepLearning.AI), written with tinydiff.

It predicts the noise eps in a noisy image x_t, given the time t/T and a context vector c:

    x (B, C, 16, 16) -init_conv-> (B, n, 16, 16) -down1-> (B, n, 8, 8) -down2-> (B, 2n, 4, 4)
      -to_vec-> (B, 2n, 1, 1) -up0-> (B, 2n, 4, 4)
      -up1(cemb1 * . + temb1, down2)-> (B, n, 8, 8) -up2(cemb2 * . + temb2, down1)-> (B, n, 16, 16)
      -out(cat(., init_conv))-> (B, C, 16, 16)

Time and context each pass through a small MLP (Linear-GELU-Linear) and are injected at two
decoder levels as `context * features + time`: the context scales the features, time shifts them.

Every module, attribute and child order matches the course's PyTorch code, so `state_dict()`
keys are the same (`init_conv.conv1.0.weight`, `down1.model.0.conv1.1.running_mean`,
`up0.0.weight`, `out.3.bias`, ...) and weights move between tinydiff and PyTorch one to one.

Two departures, both documented where they happen:
  1. The course's ResidualConvBlock, when in and out channels differ, builds a NEW random 1x1
     convolution on every forward call (`shortcut = nn.Conv2d(...)` inside forward), so the
     residual path is random noise that is never trained and differs between calls. Ours is a
     learned 1x1 convolution held as `shortcut` (keys `init_conv.shortcut.weight`, `.bias`),
     created only when the channel counts differ. That is the only extra state-dict entry.
  2. `to_vec` pools with AvgPool2d(height // 4) rather than a fixed AvgPool2d(4), so that small
     images (height 8 in the tests) reduce to 1x1 too. For height 16 this is the course's layer.
"""
from tinydiff import nn
from tinydiff.arrays import as_array, as_labels
from tinydiff.tensor import Tensor, cat


class ResidualConvBlock(nn.Module):
    """Two (conv 3x3 -> BatchNorm -> GELU) layers; with is_res, a residual: (x + x2) / 1.414."""

    def __init__(self, in_channels, out_channels, is_res=False):
        super().__init__()
        self.is_res = is_res
        self.same_channels = in_channels == out_channels
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 1, 1),
                                   nn.BatchNorm2d(out_channels), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, 1, 1),
                                   nn.BatchNorm2d(out_channels), nn.GELU())
        if is_res and not self.same_channels:
            # The fix: a learned 1x1 conv that maps x to out_channels (the course makes a new random one per call)
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x):                                        # (B, in, H, W)
        x2 = conv_bn_gelu(self.conv2, conv_bn_gelu(self.conv1, x))   # (B, out, H, W)
        if not self.is_res:
            return x2
        skip = x if self.same_channels else self.shortcut(x)     # (B, out, H, W)
        return (skip + x2) / 1.414                               # the course's constant, ~sqrt(2): keeps the variance near 1


def conv_bn_gelu(layers, x):
    """layers = Sequential(Conv2d, BatchNorm2d, GELU), with the norm and the GELU run as one fused
    op (F.batch_norm_gelu: one pass over memory fewer each way). The same function as layers(x)."""
    conv, norm, _ = layers
    return norm(conv(x), then_gelu=True)


class UnetDown(nn.Module):
    """Two residual blocks, then halve the resolution with a 2x2 max pool."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.model = nn.Sequential(ResidualConvBlock(in_channels, out_channels),
                                   ResidualConvBlock(out_channels, out_channels), nn.MaxPool2d(2))

    def forward(self, x):                                        # (B, in, H, W) -> (B, out, H/2, W/2)
        return self.model(x)


class UnetUp(nn.Module):
    """Concatenate the skip connection, double the resolution (2x2 transposed conv), two residual blocks."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.model = nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, 2),
                                   ResidualConvBlock(out_channels, out_channels),
                                   ResidualConvBlock(out_channels, out_channels))

    def forward(self, x, skip):                                  # (B, a, H, W), (B, b, H, W) with a + b = in
        x = cat((x, skip), 1)                                    # (B, in, H, W)
        return self.model(x)                                     # (B, out, 2H, 2W)


class EmbedFC(nn.Module):
    """A small MLP, Linear-GELU-Linear, embedding a (B, input_dim) vector into (B, emb_dim)."""

    def __init__(self, input_dim, emb_dim):
        super().__init__()
        self.input_dim = input_dim
        self.model = nn.Sequential(nn.Linear(input_dim, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, x):                                        # (B, input_dim), or anything with B*input_dim values
        return self.model(x.view(-1, self.input_dim))            # (B, emb_dim)


class ContextUnet(nn.Module):
    """The course's noise predictor eps_theta(x_t, t, c).

    forward(x, t, c=None):
        x  (B, in_channels, height, height) noisy images x_t
        t  the time as a FRACTION, timestep / T, one per sample: any shape with B elements
           (e.g. (B,) or (B, 1)), or a single value used for the whole batch.  time_input(t, T) gives it.
        c  (B, n_cfeat) context vectors (e.g. one-hot labels), or None for zeros: the "unconditional"
           context, as the course's context masking multiplies c by 0.  null_context(B) gives it.
    returns (B, in_channels, height, height) the predicted noise.

    The conditioning seam (the same three methods on every noise predictor; the trainer, the
    samplers, the CLI and the demos call only these):
        context(labels)     class labels (B,) -> one-hot context vectors (B, n_cfeat)
        null_context(B)     zeros (B, n_cfeat): "no context", for classifier-free guidance
        time_input(t, T)    timestep indices t (B,) -> the fraction (t + 1) / T
    """

    def __init__(self, in_channels, n_feat=64, n_cfeat=5, height=16):
        super().__init__()
        if height % 4:
            raise ValueError(f"ContextUnet: height must be divisible by 4 (two 2x down-samplings), got {height}")
        if n_feat % 8:
            raise ValueError(f"ContextUnet: n_feat must be divisible by 8 (GroupNorm(8, n_feat)), got {n_feat}")
        self.in_channels, self.n_feat, self.n_cfeat, self.height = in_channels, n_feat, n_cfeat, height
        self.config = dict(in_channels=in_channels, n_feat=n_feat, n_cfeat=n_cfeat, height=height)
        n, h = n_feat, height

        self.init_conv = ResidualConvBlock(in_channels, n, is_res=True)   # (B, C, h, h) -> (B, n, h, h)
        self.down1 = UnetDown(n, n)                              # -> (B, n, h/2, h/2)
        self.down2 = UnetDown(n, 2 * n)                          # -> (B, 2n, h/4, h/4)
        self.to_vec = nn.Sequential(nn.AvgPool2d(h // 4), nn.GELU())   # -> (B, 2n, 1, 1)

        self.timeembed1 = EmbedFC(1, 2 * n)                      # (B, 1) -> (B, 2n)
        self.timeembed2 = EmbedFC(1, n)                          # (B, 1) -> (B, n)
        self.contextembed1 = EmbedFC(n_cfeat, 2 * n)             # (B, n_cfeat) -> (B, 2n)
        self.contextembed2 = EmbedFC(n_cfeat, n)                 # (B, n_cfeat) -> (B, n)

        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n, 2 * n, h // 4, h // 4),   # (B, 2n, 1, 1) -> (B, 2n, h/4, h/4)
                                 nn.GroupNorm(8, 2 * n), nn.ReLU())
        self.up1 = UnetUp(4 * n, n)                              # cat -> (B, 4n, h/4, h/4) -> (B, n, h/2, h/2)
        self.up2 = UnetUp(2 * n, n)                              # cat -> (B, 2n, h/2, h/2) -> (B, n, h, h)
        self.out = nn.Sequential(nn.Conv2d(2 * n, n, 3, 1, 1),  # cat -> (B, 2n, h, h) -> (B, n, h, h)
                                 nn.GroupNorm(8, n), nn.ReLU(),
                                 nn.Conv2d(n, in_channels, 3, 1, 1))   # -> (B, C, h, h)

    # --- the conditioning seam -----------------------------------------------------------------
    def context(self, labels):
        """Class labels (B,) integers in [0, n_cfeat) -> one-hot vectors (B, n_cfeat) on the model's
        device, in its dtype (the course's context); None -> None, the null context in forward."""
        if labels is None:
            return None
        w = self.out[3].weight
        labels = as_labels(labels, self.n_cfeat, w.device, "ContextUnet.context")
        return w.xp.eye(self.n_cfeat, dtype=w.dtype)[labels]               # (B, n_cfeat)

    def null_context(self, batch):
        """The unconditional context: zeros (B, n_cfeat), on the model's device and dtype."""
        w = self.out[3].weight
        return w.xp.zeros((batch, self.n_cfeat), dtype=w.dtype)

    def time_input(self, t, T):
        """Timestep indices t (B,) in 0..T-1 -> the fraction (t + 1) / T, the course's t / T with its
        t in 1..T (diffusion.py explains the shift). float64; forward casts it to x's dtype."""
        return Tensor((t + 1) / T)

    def forward(self, x, t, c=None):
        x, t, c = self._check_inputs(x, t, c)
        n = self.n_feat
        x = self.init_conv(x)                                    # (B, n, h, h)
        down1 = self.down1(x)                                    # (B, n, h/2, h/2)
        down2 = self.down2(down1)                                # (B, 2n, h/4, h/4)
        hiddenvec = self.to_vec(down2)                           # (B, 2n, 1, 1)

        cemb1 = self.contextembed1(c).view(-1, 2 * n, 1, 1)      # (B, 2n, 1, 1)
        temb1 = self.timeembed1(t).view(-1, 2 * n, 1, 1)         # (B or 1, 2n, 1, 1)
        cemb2 = self.contextembed2(c).view(-1, n, 1, 1)          # (B, n, 1, 1)
        temb2 = self.timeembed2(t).view(-1, n, 1, 1)             # (B or 1, n, 1, 1)

        up1 = self.up0(hiddenvec)                                # (B, 2n, h/4, h/4)
        up2 = self.up1(cemb1 * up1 + temb1, down2)               # (B, n, h/2, h/2)
        up3 = self.up2(cemb2 * up2 + temb2, down1)               # (B, n, h, h)
        return self.out(cat((up3, x), 1))                        # (B, 2n, h, h) -> (B, C, h, h)

    def _check_inputs(self, x, t, c):
        """Refuse misshapen input with a message naming the shapes; turn t and c into Tensors like x."""
        if not isinstance(x, Tensor):
            raise TypeError(f"ContextUnet: x must be a Tensor, got {type(x).__name__}")
        want = (self.in_channels, self.height, self.height)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(f"ContextUnet: x must have shape (B, {want[0]}, {want[1]}, {want[2]}), got {x.shape}")
        b = x.shape[0]
        t = _tensor_like(t, x)
        if t.size() not in (1, b):
            raise ValueError(f"ContextUnet: t must hold one value per sample ({b}) or one in all, got shape {t.shape}")
        c = _tensor_like(self.null_context(b) if c is None else c, x)
        if c.shape != (b, self.n_cfeat):
            raise ValueError(f"ContextUnet: c must have shape ({b}, {self.n_cfeat}) (context vectors), got {c.shape}")
        return x, t, c


def _tensor_like(v, x):
    """v (a Tensor, an array on x's device, a number) as a Tensor of x's dtype; Tensors keep their graph."""
    if not isinstance(v, Tensor):
        v = Tensor(as_array(v, x.device))
    return v if v.dtype == x.dtype else v.astype(x.dtype)
