"""Captions for the digits, derived from the images themselves.

The digits come with a class label and nothing else. A text-conditioned model needs sentences, so
each image gets two measured attributes, judged against the real training digits of its class:

    stroke weight  ink(x) = the mean pixel of the 16x16 image in [0, 1]
                   "thick" in the class's top third, "thin" in its bottom third, unnamed otherwise
    slant          from the intensity-weighted central moments (x to the right, y DOWN):
                       mu11 = sum w (x - xc)(y - yc) / sum w,   mu02 = sum w (y - yc)^2 / sum w
                       slant = -mu11 / mu02   (the shear dx/dy of the best-fit axis, with its sign
                                               flipped so that a top leaning right is positive)
                   "slanted right" in the class's top third, "slanted left" in its bottom third

A caption is then drawn at random from templates with synonyms, anew each time an image is
drawn ("7", "a thick seven", "the digit 7, bold and leaning right"), so that the model learns what
the words mean rather than one sentence per image:

    captions = digit_captions()                       # the thirds of the training digits
    captions.captions([0, 1, 2], np.random.default_rng(0))
    # e.g. ['the digit 0', 'a thin one slanted right', '2, heavy']

Four class x attribute combinations are held out (HELD_OUT): no training caption names them, and
those images are captioned without that attribute. Whether "a thick 3" still comes out thick is
the test of whether the text encoder composes "thick" and "3" rather than memorising pairs.

The same functions score samples (tinydiff/evaluate.py): the prompt says what the picture should
be (parse_prompt), ink and slant measure what it is.
"""
import re

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The synonyms of each attribute value: (axis, sign) -> phrases. weight: thin -1, thick +1; lean: left -1, right +1
SYNONYMS = {
    ("weight", +1): ("thick", "bold", "heavy"),
    ("weight", -1): ("thin", "light", "fine"),
    ("lean", +1): ("slanted right", "leaning right", "tilted right"),
    ("lean", -1): ("slanted left", "leaning left", "tilted left"),
}
# One list of templates per set of attributes named. {digit} is "7" or "seven".
TEMPLATES = {
    (): ("{digit}", "a {digit}", "the digit {digit}", "the number {digit}", "a handwritten {digit}"),
    ("weight",): ("a {weight} {digit}", "the digit {digit}, {weight}", "{digit}, {weight}",
                  "a {weight} handwritten {digit}"),
    ("lean",): ("a {digit} {lean}", "the digit {digit}, {lean}", "{digit}, {lean}",
                "a handwritten {digit} {lean}"),
    ("weight", "lean"): ("a {weight} {digit} {lean}", "the digit {digit}, {weight} and {lean}",
                         "{digit}, {weight}, {lean}", "a {weight} handwritten {digit} {lean}"),
}
# Combinations no training caption names: the images are captioned without that attribute.
HELD_OUT = ((3, "thick"), (8, "thin"), (5, "slanted left"), (2, "slanted right"))
ATTRIBUTE_OF_WORD = {"thick": ("weight", +1), "thin": ("weight", -1),
                     "slanted left": ("lean", -1), "slanted right": ("lean", +1)}
P_DIGIT_ONLY = 0.25      # captions that name the digit alone, whatever the image looks like, so
                         # that "7" is trained on every 7 (the class-only prompts' distribution)
P_NAME = 0.75            # otherwise, each attribute the image has is named with this probability


# ---------------------------------------------------------------------------------------------
# The attributes


def _check_images01(images, name="images"):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"{name}: expected (N, 1, H, W) grey images, got shape {images.shape}")
    if images.size and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"{name}: pixel values must lie in [0, 1] (map [-1, 1] images with (x + 1) / 2), "
                         f"got min {images.min():.4g}, max {images.max():.4g}")
    return images.astype(np.float64)


def ink(images):
    """(N, 1, H, W) in [0, 1] -> (N,) float64: the mean pixel, the stroke weight."""
    return _check_images01(images).mean(axis=(1, 2, 3))


def slant(images):
    """(N, 1, H, W) in [0, 1] -> (N,) float64: -mu11 / mu02 of the intensity-weighted central
    moments, y pointing down; positive when the top leans right. 0 for an image with no ink or no
    vertical extent (mu02 = 0), where a slant is not defined."""
    w = _check_images01(images)[:, 0]                           # (N, H, W) weights
    h, wd = w.shape[1:]
    y, x = np.mgrid[0:h, 0:wd].astype(np.float64)               # (H, W) row (down), column (right)
    mass = w.sum(axis=(1, 2))                                   # (N,)
    safe = np.where(mass > 0, mass, 1.0)
    yc = (w * y).sum(axis=(1, 2)) / safe                        # (N,) centroid
    xc = (w * x).sum(axis=(1, 2)) / safe
    dy = y - yc[:, None, None]                                  # (N, H, W)
    dx = x - xc[:, None, None]
    mu11 = (w * dx * dy).sum(axis=(1, 2)) / safe
    mu02 = (w * dy * dy).sum(axis=(1, 2)) / safe
    return np.where(mu02 > 0, -mu11 / np.where(mu02 > 0, mu02, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------
# The captions


class DigitCaptions:
    """Per-class thirds (and medians) of ink and slant from `images` (N, 1, 16, 16) in [0, 1] with
    their `labels` (N,) 0..9 (the training digits); the captions of those images by index.
    Nothing to save in a checkpoint: the thresholds are recomputed from the same data."""

    def __init__(self, images, labels):
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels: expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"labels: digits 0..9 only, got {labels.min()}..{labels.max()}")
        missing = sorted(set(range(10)) - set(labels.tolist()))
        if missing:
            raise ValueError(f"labels: no images of digit(s) {missing}: the thirds are per class")
        self.ink, self.slant = ink(images), slant(images)       # (N,) each, of the training images
        self.labels = labels.astype(np.int64)
        by_class = lambda v, q: np.array([np.quantile(v[self.labels == k], q) for k in range(10)])
        self.ink_thirds = by_class(self.ink, [1 / 3, 2 / 3])     # (10, 2): bottom / top third edges
        self.slant_thirds = by_class(self.slant, [1 / 3, 2 / 3])
        self.ink_median = by_class(self.ink, 0.5)                # (10,): the sides of prompt fidelity
        self.slant_median = by_class(self.slant, 0.5)
        self.weight, self.lean = self._thirds(self.ink, self.slant, self.labels)

    def _thirds(self, ink_values, slant_values, labels):
        def side(v, edges):                                      # -1 bottom third, +1 top, 0 middle
            return np.where(v > edges[:, 1], 1, np.where(v < edges[:, 0], -1, 0)).astype(np.int64)
        return side(ink_values, self.ink_thirds[labels]), side(slant_values, self.slant_thirds[labels])

    def attributes(self, images, labels):
        """(weight, lean) of any images (N, 1, 16, 16) in [0, 1] against the thirds of their
        classes `labels`: int64 (N,) each in {-1, 0, +1} (thin/thick, left/right)."""
        labels = np.asarray(labels, dtype=np.int64)
        return self._thirds(ink(images), slant(images), labels)

    def captions(self, indices, rng):
        """One random caption per training image index (a random template and synonyms each call,
        from the numpy Generator `rng`); held-out attributes are never named."""
        return [self.caption(int(self.labels[i]), int(self.weight[i]), int(self.lean[i]), rng)
                for i in np.asarray(indices).reshape(-1)]

    @staticmethod
    def caption(digit, weight, lean, rng):
        """A random caption of a `digit` with attributes weight, lean in {-1, 0, +1}."""
        named = {}
        if rng.random() >= P_DIGIT_ONLY:
            for axis, sign in (("weight", weight), ("lean", lean)):
                held_out = any(ATTRIBUTE_OF_WORD[word] == (axis, sign) and d == digit for d, word in HELD_OUT)
                if sign != 0 and not held_out and rng.random() < P_NAME:
                    named[axis] = SYNONYMS[(axis, sign)][rng.integers(len(SYNONYMS[(axis, sign)]))]
        templates = TEMPLATES[tuple(named)]
        template = templates[rng.integers(len(templates))]
        name = str(digit) if rng.random() < 0.5 else DIGIT_WORDS[digit]
        text = template.format(digit=name, **named)
        return re.sub(r"\ba (8|eight)\b", r"an \1", text)       # "an eight"


def digit_captions():
    """DigitCaptions of the training split of the embedded digits (tinydiff.data.load_digits)."""
    from tinydiff.data import load_digits
    images, labels, _ = load_digits("train")
    return DigitCaptions((images.astype(np.float64) + 1) / 2, labels)     # [-1, 1] -> [0, 1]


# ---------------------------------------------------------------------------------------------
# Words


def split_words(text):
    """Lower-cased words, punctuation split off as its own token (as the tokenizer splits)."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def caption_vocabulary():
    """Every token any template can produce (lower case, sorted), punctuation included."""
    texts = [t.format(digit="", weight="", lean="") for group in TEMPLATES.values() for t in group]
    texts += list(DIGIT_WORDS) + [str(d) for d in range(10)] + ["an"]
    texts += [phrase for phrases in SYNONYMS.values() for phrase in phrases]
    return sorted({w for text in texts for w in split_words(text)})


def parse_prompt(prompt):
    """What a prompt asks for: (digit, weight, lean); digit -1 when none is named, weight and lean
    0 when unnamed (else -1 / +1 as in DigitCaptions). The first digit named counts; unknown words
    are ignored."""
    words = split_words(prompt)
    digits = [int(w) if w.isdigit() else DIGIT_WORDS.index(w) for w in words
              if (w.isdigit() and len(w) == 1) or w in DIGIT_WORDS]
    found = {"weight": 0, "lean": 0}
    for (axis, sign), phrases in SYNONYMS.items():
        for phrase in phrases:
            n = len(phrase.split())
            if any(words[i:i + n] == phrase.split() for i in range(len(words))):
                found[axis] = sign
    return (digits[0] if digits else -1), found["weight"], found["lean"]
