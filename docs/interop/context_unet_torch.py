"""tinydiff's ContextUnet in PyTorch: the course's module ("How Diffusion Models Work",
DeepLearning.AI), with one change, a learned 1x1 `shortcut`. Copy this file; it needs only torch.

    from context_unet_torch import ContextUnet
    from safetensors.torch import load_file
    model = ContextUnet(in_channels=1, n_feat=32, n_cfeat=10, height=16)   # a run's config.json:
    model.load_state_dict(load_file("runs/digits/model.safetensors"))       # in_channels, n_feat,
    model.eval()                                                             # num_classes, height
    eps = model(x_t, t, c)   # x_t (B, C, H, H); t (B, 1) = (step + 1) / T; c (B, n_cfeat) one-hot or None

A tinydiff run's weights load with strict=True: the keys are the same, module for module. The
course's own checkpoint lacks the two keys of the learned shortcut, `init_conv.shortcut.weight`
(n_feat, in_channels, 1, 1) and `init_conv.shortcut.bias` (n_feat,): load it with strict=False,
and those two keep PyTorch's default initialisation, U(+-1/sqrt(in_channels)).
learned_shortcut=False gives the course's module itself, which builds a new random 1x1
convolution on every call. tinydiff's tests compare this file with tinydiff, value and gradient.
"""
import torch
from torch import nn


class ResidualConvBlock(nn.Module):
    def __init__(self, in_channels, out_channels, is_res=False, learned_shortcut=True):
        super().__init__()
        self.same_channels = in_channels == out_channels
        self.is_res = is_res
        self.learned_shortcut = learned_shortcut
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 1, 1),
                                   nn.BatchNorm2d(out_channels), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, 1, 1),
                                   nn.BatchNorm2d(out_channels), nn.GELU())
        if is_res and not self.same_channels and learned_shortcut:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)   # the one change

    def forward(self, x):
        x2 = self.conv2(self.conv1(x))
        if not self.is_res:
            return x2
        if self.same_channels:
            out = x + x2
        elif self.learned_shortcut:
            out = self.shortcut(x) + x2
        else:                                                    # the course: a new random conv per call
            out = nn.Conv2d(x.shape[1], x2.shape[1], 1, 1, 0).to(x.device)(x) + x2
        return out / 1.414


class UnetUp(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.model = nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, 2),
                                   ResidualConvBlock(out_channels, out_channels),
                                   ResidualConvBlock(out_channels, out_channels))

    def forward(self, x, skip):
        return self.model(torch.cat((x, skip), 1))


class UnetDown(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.model = nn.Sequential(ResidualConvBlock(in_channels, out_channels),
                                   ResidualConvBlock(out_channels, out_channels), nn.MaxPool2d(2))

    def forward(self, x):
        return self.model(x)


class EmbedFC(nn.Module):
    def __init__(self, input_dim, emb_dim):
        super().__init__()
        self.input_dim = input_dim
        self.model = nn.Sequential(nn.Linear(input_dim, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, x):
        return self.model(x.view(-1, self.input_dim))


class ContextUnet(nn.Module):
    def __init__(self, in_channels, n_feat=64, n_cfeat=5, height=16, learned_shortcut=True):
        super().__init__()
        n, h = n_feat, height
        self.n_feat, self.n_cfeat = n, n_cfeat
        self.init_conv = ResidualConvBlock(in_channels, n, is_res=True, learned_shortcut=learned_shortcut)
        self.down1 = UnetDown(n, n)
        self.down2 = UnetDown(n, 2 * n)
        self.to_vec = nn.Sequential(nn.AvgPool2d(h // 4), nn.GELU())   # the course: AvgPool2d(4), h = 16
        self.timeembed1 = EmbedFC(1, 2 * n)
        self.timeembed2 = EmbedFC(1, n)
        self.contextembed1 = EmbedFC(n_cfeat, 2 * n)
        self.contextembed2 = EmbedFC(n_cfeat, n)
        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n, 2 * n, h // 4, h // 4),
                                 nn.GroupNorm(8, 2 * n), nn.ReLU())
        self.up1 = UnetUp(4 * n, n)
        self.up2 = UnetUp(2 * n, n)
        self.out = nn.Sequential(nn.Conv2d(2 * n, n, 3, 1, 1), nn.GroupNorm(8, n), nn.ReLU(),
                                 nn.Conv2d(n, in_channels, 3, 1, 1))

    def forward(self, x, t, c=None):
        n = self.n_feat
        x = self.init_conv(x)                                    # (B, n, h, h)
        down1 = self.down1(x)                                    # (B, n, h/2, h/2)
        down2 = self.down2(down1)                                # (B, 2n, h/4, h/4)
        hiddenvec = self.to_vec(down2)                           # (B, 2n, 1, 1)
        if c is None:                                            # the unconditional context: zeros
            c = torch.zeros(x.shape[0], self.n_cfeat).to(x)
        cemb1 = self.contextembed1(c).view(-1, n * 2, 1, 1)
        temb1 = self.timeembed1(t).view(-1, n * 2, 1, 1)
        cemb2 = self.contextembed2(c).view(-1, n, 1, 1)
        temb2 = self.timeembed2(t).view(-1, n, 1, 1)
        up1 = self.up0(hiddenvec)                                # (B, 2n, h/4, h/4)
        up2 = self.up1(cemb1 * up1 + temb1, down2)               # context scales, time shifts
        up3 = self.up2(cemb2 * up2 + temb2, down1)               # (B, n, h, h)
        return self.out(torch.cat((up3, x), 1))                  # (B, in_channels, h, h)
