"""How good are generated digits? Conditional accuracy and a Frechet distance, with a floor.

A small CNN digits classifier, trained with tinydiff on the TRAIN split of the embedded digits
(`scripts/train_digits_classifier.py`, weights shipped as `tinydiff/digits_classifier.safetensors`),
scores a set of samples, each generated for a label y:

  accuracy  the fraction of samples that the classifier puts in the class they were conditioned
            on (argmax of its logits == y).
  frechet   the Frechet distance between two Gaussians fitted to the classifier's penultimate
            features (64 numbers per image, after the ReLU): the samples' and the held-out TEST
            digits' (of the classes present in the samples). This is FID's formula (Heusel et al.
            2017, arXiv:1706.08500) in a digits classifier's feature space instead of Inception's:
                d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))
  floor     the same distance between real digits and the same test digits: a subset of the
            TRAIN split drawn with the samples' label counts (per class, without replacement;
            all of a class's train digits when the samples ask for more), averaged over
            FLOOR_DRAWS seeded draws. Train and test are disjoint, and the subset has the
            samples' size, so the floor carries the same small-sample bias. A model that drew
            perfectly from the training distribution would score about the floor.
  ratio     frechet / floor: 1.0 is as close to the held-out digits as real training digits are.

The test split is the one `tinydiff.data` holds out from diffusion training, so neither the
classifier nor the diffusion model has seen the reference digits.

Images are NCHW float in [0, 1], 1 x 16 x 16, as `tinydiff sample` writes them to samples.npz.

Prompt fidelity (a text run's samples.npz also holds `prompts`, and labels -1 where a prompt names
no digit): per prompt, with parse_prompt and the attribute functions that made the captions
(tinydiff/captions.py),
  class     the accuracy above, over the samples of prompts that name a digit
  weight    the fraction of samples on the prompted side of the median ink of the real training
            digits of the class (the prompt's digit; the classifier's where it names none)
  slant     the same with the median slant
  frechet   with its floor, for the prompts that name a digit and nothing else (class-only)
The held-out combinations (captions.HELD_OUT) are summed up apart from the others.
"""
import os

import numpy as np

from tinydiff import backend, captions, data, nn
from tinydiff.checkpoint import load_weights
from tinydiff import functional as F
from tinydiff.tensor import Tensor, no_grad

CLASSIFIER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_classifier.safetensors")
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 16, 16)
FLOOR_DRAWS = 5            # train subsets averaged into the floor
FLOOR_SEED = 0


class DigitsClassifier(nn.Module):
    """(B, 1, 16, 16) in [-1, 1] -> 10 logits; `features` gives the 64 penultimate activations."""

    def __init__(self, width=32, num_features=64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)             # 16x16
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)     # 8x8 after the first pool
        self.fc1 = nn.Linear(2 * width * 4 * 4, num_features)
        self.fc2 = nn.Linear(num_features, NUM_CLASSES)

    def features(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)                  # (B, w, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)                  # (B, 2w, 4, 4)
        return F.relu(self.fc1(h.flatten(1)))                       # (B, 64)

    def forward(self, x):
        return self.fc2(self.features(x))                           # (B, 10)


def load_classifier(path=CLASSIFIER_FILE, device="cpu"):
    """The shipped classifier, in eval mode, on `device`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the digits classifier is missing; "
                                f"make it with: python scripts/train_digits_classifier.py")
    model = load_weights(DigitsClassifier(), path)
    return model.to(device).eval()


@no_grad()
def classify(model, images01, batch_size=512):
    """images (N, 1, 16, 16) in [0, 1] -> (logits (N, 10), features (N, 64)), NumPy float64."""
    device = model.fc2.weight.device
    logits, feats = [], []
    for i in range(0, len(images01), batch_size):
        x = np.asarray(images01[i:i + batch_size], dtype=np.float32) * 2 - 1   # [0,1] -> [-1,1]
        h = model.features(Tensor(backend.to_device(x, device)))
        logits.append(model.fc2(h).numpy())
        feats.append(h.numpy())
    return np.concatenate(logits).astype(np.float64), np.concatenate(feats).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# The Frechet distance between two Gaussians


def gaussian_stats(feats):
    """Mean and covariance (N-1 normalised, as FID) of features (N, D), in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def sqrtm_psd(a):
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigh.
    Round-off can make tiny eigenvalues negative: they are clipped to 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, s1, mu2, s2):
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).
    S1 S2 is not symmetric, but it is similar to r S2 r with r = S1^(1/2) (multiply by r^-1 on the
    left and r on the right), which is symmetric PSD: the same eigenvalues, so the same trace of
    the square root, and eigh suffices (no scipy.linalg.sqrtm, no complex round-off)."""
    r = sqrtm_psd(s1)
    eig = np.linalg.eigvalsh((r @ s2 @ r + (r @ s2 @ r).T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def frechet_of_features(f1, f2):
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


# ---------------------------------------------------------------------------------------------
# Checking what we are given


def check_samples(images, labels, name="samples", unnamed_ok=False):
    """Refuse anything that is not N x 1 x 16 x 16 float in [0, 1] with N integer labels 0..9
    (or -1, a prompt that names no digit, when `unnamed_ok`). `name` (a file name) is put in
    every message. Returns (images float32, labels int64)."""
    if labels is None:
        raise ValueError(f"{name}: no labels; a conditional accuracy needs the label each sample "
                         f"was generated for ('labels', int, shape (N,))")
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{name}: images must have shape (N, 1, 16, 16) (NCHW digits), got {images.shape}")
    if len(images) < 2:
        raise ValueError(f"{name}: need at least 2 images to fit a covariance, got {len(images)}")
    if images.dtype.kind != "f":
        raise TypeError(f"{name}: images must be floats in [0, 1], got dtype {images.dtype}")
    if not np.isfinite(images).all():
        raise ValueError(f"{name}: images contain {int((~np.isfinite(images)).sum())} NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{name}: image values must lie in [0, 1] (as `tinydiff sample` writes them), "
                         f"got min {lo:.4g}, max {hi:.4g}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{name}: labels must be integers, got dtype {labels.dtype}")
    if labels.shape != (len(images),):
        raise ValueError(f"{name}: labels have shape {labels.shape}, expected ({len(images)},): "
                         f"one label per image")
    if labels.min() < (-1 if unnamed_ok else 0) or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{name}: labels must be digits 0..9{' (or -1: no digit named)' if unnamed_ok else ''}, "
                         f"got min {labels.min()}, max {labels.max()}")
    return images.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)


def check_prompts(prompts, labels, name="samples"):
    """Refuse prompts that are not a fixed-width unicode array (N,) whose digits are the labels."""
    prompts = np.asarray(prompts)
    if prompts.dtype.kind != "U":
        raise TypeError(f"{name}: prompts must be a fixed-width unicode array (loads without pickle), "
                        f"got dtype {prompts.dtype}")
    if prompts.shape != labels.shape:
        raise ValueError(f"{name}: prompts have shape {prompts.shape}, expected {labels.shape}: one per image")
    for prompt in np.unique(prompts):
        named = captions.parse_prompt(str(prompt))[0]
        wrong = np.unique(labels[prompts == prompt])
        if wrong.tolist() != [named]:
            raise ValueError(f"{name}: the prompt {str(prompt)!r} names digit {named}, but its images "
                             f"have labels {wrong.tolist()}")
    return prompts


def load_samples(path):
    """(images, labels, prompts) from a samples.npz written by `tinydiff sample`, checked; prompts
    is None for a label-conditioned run's samples."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (make one with `tinydiff sample ... --out DIR`)")
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from None
    if "images" not in arrays:
        raise ValueError(f"{path}: no 'images' array (found {sorted(arrays)})")
    prompted = "prompts" in arrays
    images, labels = check_samples(arrays["images"], arrays.get("labels"), name=path, unnamed_ok=prompted)
    return images, labels, check_prompts(arrays["prompts"], labels, path) if prompted else None


# ---------------------------------------------------------------------------------------------
# The real digits, scored once


def real_digits():
    """(train_x, train_y, test_x, test_y): the embedded digits' fixed split, images in [0, 1]."""
    train_x, train_y, test_x, test_y = data.digits_split()
    to01 = lambda x: (np.asarray(x, dtype=np.float32) + 1) / 2                # [-1,1] -> [0,1]
    return to01(train_x), np.asarray(train_y), to01(test_x), np.asarray(test_y)


_real_cache = []          # [(classifier, features...)]: the last classifier's real-digit features


def _real_features(model):
    """(train features, train labels, test features, test labels), computed once per classifier."""
    if not _real_cache or _real_cache[0][0] is not model:      # holding the model keeps `is` honest
        train_x, train_y, test_x, test_y = real_digits()
        _real_cache[:] = [(model, classify(model, train_x)[1], train_y, classify(model, test_x)[1], test_y)]
    return _real_cache[0][1:]


def evaluate(images, labels, classifier=None, device="cpu", name="samples"):
    """Score samples (N, 1, 16, 16) in [0, 1] generated for `labels` (N,). Returns a dict:
    n, accuracy, per_class (label -> accuracy), frechet, floor, ratio, n_reference."""
    images, labels = check_samples(images, labels, name)
    model = classifier if classifier is not None else load_classifier(device=device)
    logits, feats = classify(model, images)
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    classes = np.unique(labels)
    per_class = {int(c): float((logits[labels == c].argmax(axis=1) == c).mean()) for c in classes}

    frechet, floor, n_reference = frechet_and_floor(feats, labels, model)
    return {"n": len(images), "accuracy": accuracy, "per_class": per_class, "frechet": frechet,
            "floor": floor, "ratio": frechet / floor if floor > 0 else float("inf"),
            "n_reference": n_reference}


def frechet_and_floor(feats, labels, model):
    """(frechet, floor, n_reference) of sample features (N, 64) generated for labels (N,)."""
    train_f, train_y, test_f, test_y = _real_features(model)
    classes = np.unique(labels)
    reference = test_f[np.isin(test_y, classes)]                   # held-out digits of these classes
    frechet = frechet_of_features(feats, reference)

    rng = np.random.default_rng(FLOOR_SEED)
    floors = []
    for _ in range(FLOOR_DRAWS):                                   # real train digits, same label counts
        pick = np.concatenate([rng.permutation(np.flatnonzero(train_y == c))[:(labels == c).sum()]
                               for c in classes])
        floors.append(frechet_of_features(train_f[pick], reference))
    return frechet, float(np.mean(floors)), len(reference)


def format_report(result, name="samples"):
    """The evaluation as a few readable lines."""
    per_class = "  ".join(f"{c}:{a:.0%}" for c, a in result["per_class"].items())
    return (f"{name}: {result['n']} samples\n"
            f"  conditional accuracy  {result['accuracy']:.1%}   ({per_class})\n"
            f"  Frechet distance      {result['frechet']:.3f}   to {result['n_reference']} held-out test digits\n"
            f"  real-data floor       {result['floor']:.3f}   (train digits with the same label counts, "
            f"mean of {FLOOR_DRAWS} draws)\n"
            f"  ratio                 {result['ratio']:.2f}x")


# ---------------------------------------------------------------------------------------------
# Prompt fidelity: does each picture show what its prompt asked for?

_medians_cache = []       # [(ink medians (10,), slant medians (10,))] of the real training digits


def _class_medians():
    if not _medians_cache:
        c = captions.digit_captions()
        _medians_cache[:] = [(c.ink_median, c.slant_median)]
    return _medians_cache[0]


def is_held_out(digit, weight, lean):
    """Whether a parsed prompt (digit, weight, lean) names one of captions.HELD_OUT."""
    asked = {("weight", weight), ("lean", lean)}
    return any(d == digit and captions.ATTRIBUTE_OF_WORD[word] in asked for d, word in captions.HELD_OUT)


def prompt_fidelity(images, labels, prompts, classifier=None, device="cpu", name="samples"):
    """Score samples (N, 1, 16, 16) in [0, 1] generated for `prompts` (N,) str, with `labels` (N,)
    the digit each names (-1: none). Returns a dict:
        prompts     one row per prompt, in the order of first appearance: prompt, n, digit, weight,
                    lean (as parse_prompt), held_out, then the scores below (None where the prompt
                    does not ask for it), and frechet, floor, ratio for class-only prompts
        overall     the scores over every sample of the prompts that are not held out
        held_out    the same over the held-out prompts (None when there are none)
        class_only  frechet, floor, ratio, n over all class-only prompts' samples (None when none)
    The scores: accuracy (of the prompts naming a digit), weight and slant (the fraction on the
    prompted side of the class's median ink, slant)."""
    images, labels = check_samples(images, labels, name, unnamed_ok=True)
    prompts = check_prompts(prompts, labels, name)
    model = classifier if classifier is not None else load_classifier(device=device)
    logits, feats = classify(model, images)
    ink_median, slant_median = _class_medians()
    judged = np.where(labels >= 0, labels, logits.argmax(axis=1))     # the class whose medians judge
    ink_side = np.sign(captions.ink(images) - ink_median[judged])      # (N,) +1 above the median
    slant_side = np.sign(captions.slant(images) - slant_median[judged])

    order = list(dict.fromkeys(prompts.tolist()))
    asked = {p: captions.parse_prompt(p) for p in order}               # prompt -> (digit, weight, lean)
    weight = np.array([asked[p][1] for p in prompts.tolist()])         # (N,) the sides asked for
    lean = np.array([asked[p][2] for p in prompts.tolist()])
    held = np.array([is_held_out(*asked[p]) for p in prompts.tolist()], dtype=bool)
    class_only = np.array([asked[p][0] >= 0 and asked[p][1:] == (0, 0) for p in prompts.tolist()], dtype=bool)

    def scores(m):                       # the three fractions over the samples in mask m
        fraction = lambda ok, where: float(ok[where].mean()) if where.any() else None
        return {"n": int(m.sum()),
                "accuracy": fraction(logits.argmax(axis=1) == labels, m & (labels >= 0)),
                "weight": fraction(ink_side == weight, m & (weight != 0)),
                "slant": fraction(slant_side == lean, m & (lean != 0))}

    def distance(m):
        if m.sum() < 2:                  # a covariance needs two samples
            return {"frechet": None, "floor": None, "ratio": None}
        frechet, floor, _ = frechet_and_floor(feats[m], labels[m], model)
        return {"frechet": frechet, "floor": floor, "ratio": frechet / floor if floor > 0 else float("inf")}

    rows = []
    for p in order:
        m = prompts == p
        digit, w, l = asked[p]
        row = dict(prompt=p, digit=digit, weight_asked=w, lean_asked=l, held_out=bool(held[m][0]), **scores(m))
        row.update(distance(m) if class_only[m][0] else {"frechet": None, "floor": None, "ratio": None})
        rows.append(row)
    return {"prompts": rows, "overall": scores(~held), "held_out": scores(held) if held.any() else None,
            "class_only": dict(n=int(class_only.sum()), **distance(class_only)) if class_only.any() else None}


def format_fidelity(result, name="samples"):
    """The prompt fidelity as a table: one row per prompt, then the summaries."""
    pct = lambda v: "-" if v is None else f"{v:.1%}"
    num = lambda v, f: "-" if v is None else format(v, f)
    width = max([len(repr(r["prompt"])) + 12 * r["held_out"] for r in result["prompts"]] + [34])
    lines = [f"{name}: prompt fidelity (class: classifier accuracy; weight, slant: samples on the prompted "
             f"side of the class's median; FD and floor for class-only prompts)",
             f"  {'prompt':<{width}} {'n':>5} {'class':>7} {'weight':>7} {'slant':>7} {'FD':>7} {'floor':>7} {'ratio':>6}"]

    def line(label, r):
        return (f"  {label:<{width}} {r['n']:>5} {pct(r['accuracy']):>7} {pct(r['weight']):>7} {pct(r['slant']):>7} "
                f"{num(r.get('frechet'), '.3f'):>7} {num(r.get('floor'), '.3f'):>7} "
                f"{num(r.get('ratio'), '.2f') + ('x' if r.get('ratio') is not None else ''):>6}")
    for r in result["prompts"]:
        lines.append(line(repr(r["prompt"]) + ("  (held out)" if r["held_out"] else ""), r))
    lines.append(line("all prompts but the held-out ones", result["overall"]))
    if result["held_out"] is not None:
        lines.append(line("the held-out combinations", result["held_out"]))
    if result["class_only"] is not None:
        c = result["class_only"]
        lines.append(line("class-only prompts, pooled", dict(c, accuracy=None, weight=None, slant=None)))
    return "\n".join(lines)
