"""A noise-aware classifier p_phi(y | x_t, t), for classifier guidance.

References
    DDPM                 Ho, Jain, Abbeel 2020, arXiv:2006.11239 (eq. 4, the noisy inputs)
    classifier guidance  Dhariwal, Nichol 2021, arXiv:2105.05233 (Sec. 4: a classifier trained on
                         noisy images x_t, whose gradient grad_{x_t} log p(y | x_t) steers sampling)

Notation: as in diffusion.py; t is a timestep index 0..T-1, and the classifier, like the course's
ContextUnet, takes the time as the fraction (t + 1) / T (its time_input(t, T)).

    clf = train_noisy_classifier(images, labels, schedule, steps=400)   # ~1 min on digits 16x16
    x = ddpm_sample(model, schedule, shape, context, classifier=clf, classifier_scale=2.0)

The network is small on purpose: three 3x3 convolutions (the second and third halve the size),
GroupNorm and SiLU, the time embedding added after the first, a global average and a linear head.
"""
import numpy as np

from tinydiff import backend, nn
from tinydiff import functional as F
from tinydiff.diffusion import model_time
from tinydiff.optim import Adam
from tinydiff.tensor import Tensor, no_grad


class NoisyClassifier(nn.Module):
    """logits = classifier(x_t, t / T): (B, C, H, W), (B,) fractions -> (B, num_classes)."""

    def __init__(self, in_channels=1, num_classes=10, n_feat=32):
        super().__init__()
        if n_feat % 8:
            raise ValueError(f"NoisyClassifier: n_feat must be divisible by 8 (GroupNorm(8, .)), got {n_feat}")
        n = n_feat
        self.config = dict(in_channels=in_channels, num_classes=num_classes, n_feat=n_feat)
        self.time_embed = nn.Sequential(nn.Linear(1, n), nn.SiLU(), nn.Linear(n, n))   # (B, 1) -> (B, n)
        self.conv1 = nn.Conv2d(in_channels, n, 3, 1, 1)          # (B, C, H, W) -> (B, n, H, W)
        self.norm1 = nn.GroupNorm(8, n)
        self.conv2 = nn.Conv2d(n, 2 * n, 3, 2, 1)                 # -> (B, 2n, H/2, W/2)
        self.norm2 = nn.GroupNorm(8, 2 * n)
        self.conv3 = nn.Conv2d(2 * n, 2 * n, 3, 2, 1)             # -> (B, 2n, H/4, W/4)
        self.norm3 = nn.GroupNorm(8, 2 * n)
        self.head = nn.Linear(2 * n, num_classes)                 # (B, 2n) -> (B, classes)

    def time_input(self, t, T):
        """Timestep indices t (B,) in 0..T-1 -> the fraction (t + 1) / T, as the ContextUnet takes."""
        return Tensor((t + 1) / T)

    def forward(self, x, t):
        b = x.shape[0]
        t = t if isinstance(t, Tensor) else Tensor(np.asarray(t, dtype=x.dtype))
        temb = self.time_embed(t.reshape(-1, 1).astype(x.dtype))              # (B or 1, n)
        h = self.norm1(self.conv1(x)) + temb.reshape(temb.shape[0], -1, 1, 1)  # (B, n, H, W)
        h = F.silu(h)
        h = F.silu(self.norm2(self.conv2(h)))                    # (B, 2n, H/2, W/2)
        h = F.silu(self.norm3(self.conv3(h)))                    # (B, 2n, H/4, W/4)
        return self.head(h.mean(axis=(2, 3)).reshape(b, -1))     # (B, classes)


def train_noisy_classifier(images, labels, schedule, steps=400, batch_size=64, lr=2e-3, n_feat=32,
                           num_classes=None, seed=0, device="cpu", log_every=0, classifier=None):
    """Train a NoisyClassifier with cross-entropy on x_t = q_sample(x0, t, eps), t uniform in 0..T-1.

    images (N, C, H, W) float in [-1, 1] (NumPy), labels (N,) integers. Batches, timesteps and noise
    come from a generator seeded with `seed`, so a run repeats. Returns the classifier in eval mode.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"train_noisy_classifier: images must be (N, C, H, W) and labels (N,) integers, "
                         f"got {images.shape} and {labels.shape} {labels.dtype}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    if classifier is None:
        backend.manual_seed(seed)                                # the layers' initial weights
        classifier = NoisyClassifier(images.shape[1], num_classes, n_feat)
    classifier.to(device).train()
    opt = Adam(classifier.parameters(), lr=lr)
    data = backend.to_device(images.astype(np.float32), device)
    ys = backend.to_device(labels.astype(np.int64), device)

    for step in range(steps):
        idx = backend.to_device(rng.integers(0, len(images), size=batch_size), device)
        x0, y = data[idx], ys[idx]
        t = backend.to_device(rng.integers(0, schedule.T, size=batch_size), device)
        eps = backend.to_device(rng.standard_normal(x0.shape, dtype=np.float32), device)
        xt = schedule.q_sample(x0, t, eps)                       # DDPM eq. 4: the classifier sees x_t
        loss = F.cross_entropy(classifier(Tensor(xt), model_time(classifier, schedule, t, xt)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"classifier step {step + 1}/{steps}  loss {loss.item():.4f}")
    classifier.zero_grad()                                       # leave no stale gradients behind
    return classifier.eval()


@no_grad()
def accuracy(classifier, schedule, images, labels, t, seed=0):
    """The fraction of images whose noised version at timestep t is classified right."""
    rng = np.random.default_rng(seed)
    x0 = np.asarray(images, dtype=np.float32)
    xt = schedule.q_sample(x0, np.full(len(x0), t), rng.standard_normal(x0.shape, dtype=np.float32))
    xt = backend.to_device(xt, classifier.parameters()[0].device)          # where the classifier is
    logits = classifier(Tensor(xt), model_time(classifier, schedule, t, xt))   # one t for the batch
    return float((logits.numpy().argmax(axis=1) == np.asarray(labels)).mean())
