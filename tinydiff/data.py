"""Data sets as plain arrays, and a batch iterator that can be stopped and resumed exactly.

Every loader returns (images, labels, num_classes):
    images  float32 (N, C, H, W), values in [-1, 1]  (the range the diffusion model works in)
    labels  int64 (N,), class indices in [0, num_classes)  (the model's context is their one-hot)

`load_dataset(spec)` picks a loader from `spec`:
    "digits"                    scikit-learn's bundled 8x8 digits (1797 real images, 10 classes),
                                upsampled to 16x16; the default, needs no download
    sprites_*.npy or its folder the course's sprites: sprites_1788_16x16.npy (N, 16, 16, 3)
                                with sprite_labels_nc_1788_16x16.npy (N, 5) one-hot contexts
    a folder of IDX files       MNIST / Fashion-MNIST: train-images-idx3-ubyte[.gz] and
                                train-labels-idx1-ubyte[.gz] (t10k-* for the test split)
    a folder of sub-folders     one class per sub-folder (sorted names), images inside (PNG, JPEG...)

Splits. digits: a fixed, stratified split, 30 images of each class for "test" (300) and the
other 1497 for "train", the same on every machine, so evaluation uses digits the model never
saw. MNIST: the train-* and t10k-* files. Sprites and image folders: "train" is everything.
"""
import gzip
import os

import numpy as np

DIGITS_TEST_PER_CLASS = 30     # 10 classes x 30 = 300 held-out digits, 1497 for training
DIGITS_SPLIT_SEED = 0          # fixed: the split never depends on the training seed


class DataError(ValueError):
    """A data set that cannot be used; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------
# Resizing


def interpolate_bilinear(x, scale_factor):
    """Resize (N, C, H, W) by an integer factor, as PyTorch's
    interpolate(x, scale_factor=s, mode="bilinear", align_corners=False).

    Output pixel i samples the input at src = (i + 0.5) / s - 0.5 (pixel centres line up),
    clamped at 0, and mixes its two neighbours: (1 - lam) x[i0] + lam x[i0 + 1], lam = src - i0,
    with i0 + 1 clamped to the last pixel. For s = 2 that is 0.75/0.25 weights.
    """
    def weights(size_in):
        src = np.maximum((np.arange(size_in * scale_factor) + 0.5) / scale_factor - 0.5, 0.0)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, size_in - 1)
        lam = src - i0
        return i0, i1, lam

    n, c, h, w = x.shape
    r0, r1, lr = weights(h)
    c0, c1, lc = weights(w)
    x = x.astype(np.float64)
    rows = x[:, :, r0, :] * (1 - lr)[:, None] + x[:, :, r1, :] * lr[:, None]   # (N, C, sH, W)
    out = rows[:, :, :, c0] * (1 - lc) + rows[:, :, :, c1] * lc                 # (N, C, sH, sW)
    return out


def pad_and_pool_28_to_16(x):
    """(N, C, 28, 28) -> (N, C, 16, 16): pad 2 background pixels per side to 32x32 (as LeNet did
    with MNIST), then average each 2x2 block."""
    n, c = x.shape[:2]
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-1.0)     # -1 is background
    return x.reshape(n, c, 16, 2, 16, 2).mean(axis=(3, 5))


# ---------------------------------------------------------------------------------------------
# Checks shared by the loaders


def _check_images(images, labels, name):
    """Final checks on any loader's output; returns float32 images and int64 labels."""
    if images.ndim != 4:
        raise DataError(f"{name}: images must be 4-D (N, C, H, W) after loading, got shape {images.shape}")
    if len(images) == 0:
        raise DataError(f"{name}: no images")
    if labels.shape != (len(images),):
        raise DataError(f"{name}: {len(labels)} labels for {len(images)} images")
    if not np.isfinite(images).all():
        raise DataError(f"{name}: images contain NaN or infinite values")
    if images.min() < -1 - 1e-6 or images.max() > 1 + 1e-6:
        raise DataError(f"{name}: images must be in [-1, 1] after scaling, got [{images.min()}, {images.max()}]")
    if labels.min() < 0:
        raise DataError(f"{name}: negative class label {labels.min()}")
    return np.ascontiguousarray(images, dtype=np.float32), labels.astype(np.int64)


def _to_unit_range(pixels, name):
    """uint8 0..255 or float in [0, 1] (or 0..255) -> float64 in [-1, 1]."""
    if pixels.dtype == np.uint8:
        return pixels / 127.5 - 1
    if pixels.dtype.kind != "f":
        raise DataError(f"{name}: images must be uint8 or float, got dtype {pixels.dtype}")
    lo, hi = float(pixels.min()), float(pixels.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"{name}: images contain NaN or infinite values")
    if lo >= 0 and hi <= 1:
        return pixels * 2.0 - 1
    if lo >= 0 and hi <= 255:
        return pixels / 127.5 - 1
    raise DataError(f"{name}: float images must be in [0, 1] or [0, 255], got [{lo}, {hi}]")


def _resize(images, image_size, name):
    """Resize to image_size: 28 -> 16 by pad-and-pool, or an integer upscale by bilinear."""
    size = images.shape[-1]
    if image_size is None or image_size == size:
        return images
    if size == 28 and image_size == 16:
        return pad_and_pool_28_to_16(images)
    if image_size % size == 0 and images.shape[-2] == size:
        return interpolate_bilinear(images, image_size // size)
    raise DataError(f"{name}: cannot resize {images.shape[-2]}x{size} images to {image_size}x{image_size} "
                    f"(supported: 28 -> 16, or an integer upscale)")


# ---------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 handwritten digits


def digits_split_indices():
    """(train, test) indices into load_digits(): per class, a seeded shuffle, the first 30 to test."""
    from sklearn.datasets import load_digits
    target = load_digits().target
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = []
    for k in range(10):
        members = np.flatnonzero(target == k)
        test.extend(rng.permutation(members)[:DIGITS_TEST_PER_CLASS])
    test = np.sort(np.array(test))
    train = np.setdiff1d(np.arange(len(target)), test)
    return train, test


def load_digits(split="train", image_size=16):
    """The 8x8 digits, pixel values 0..16 mapped to [-1, 1], bilinearly upsampled to 16x16."""
    from sklearn.datasets import load_digits as sklearn_digits
    bunch = sklearn_digits()
    train, test = digits_split_indices()
    idx = {"train": train, "test": test, "all": np.arange(len(bunch.target))}[split]
    images = bunch.images[idx][:, None] / 8.0 - 1        # (N, 1, 8, 8): 0..16 -> [-1, 1]
    images = _resize(images, image_size, "digits")       # (N, 1, 16, 16)
    images, labels = _check_images(images, bunch.target[idx], "digits")
    return images, labels, 10


def digits_split():
    """(train_images, train_labels, test_images, test_labels): the fixed split, 16x16 in [-1, 1]."""
    train_x, train_y, _ = load_digits("train")
    test_x, test_y, _ = load_digits("test")
    return train_x, train_y, test_x, test_y


# ---------------------------------------------------------------------------------------------
# The course's sprites: sprites_1788_16x16.npy (N, 16, 16, 3) + sprite_labels_nc_1788_16x16.npy


def _sprite_files(path):
    """(images.npy, labels.npy) for a sprites .npy file or the folder that holds it."""
    if os.path.isdir(path):
        path = os.path.join(path, "sprites_1788_16x16.npy")
    folder, base = os.path.split(path)
    labels = os.path.join(folder, base.replace("sprites_", "sprite_labels_nc_", 1))
    if labels == path:
        raise DataError(f"{path}: a sprites file must be named sprites_*.npy (its labels sprite_labels_nc_*.npy)")
    for f in (path, labels):
        if not os.path.isfile(f):
            raise DataError(f"{f}: file not found (sprites need both {os.path.basename(path)} and "
                            f"{os.path.basename(labels)} in {folder or '.'})")
    return path, labels


def _labels_from_context(context, name):
    """One-hot rows (N, K) -> class indices; integer (N,) labels pass through."""
    if context.ndim == 1 and context.dtype.kind in "iu":
        return context.astype(np.int64), int(context.max()) + 1
    if context.ndim != 2:
        raise DataError(f"{name}: labels must be one-hot rows (N, classes) or integers (N,), got shape {context.shape}")
    ones = (context == 1).sum(axis=1)
    zeros = (context == 0).sum(axis=1)
    bad = np.flatnonzero((ones != 1) | (ones + zeros != context.shape[1]))
    if len(bad):
        raise DataError(f"{name}: labels must be one-hot rows, row {bad[0]} is {context[bad[0]].tolist()}")
    return context.argmax(axis=1).astype(np.int64), context.shape[1]


def load_sprites(path, image_size=None):
    images_file, labels_file = _sprite_files(path)
    pixels = np.load(images_file, allow_pickle=False)
    if pixels.ndim != 4 or pixels.shape[-1] not in (1, 3):
        raise DataError(f"{images_file}: sprites must be (N, H, W, 3) images, got shape {pixels.shape}")
    labels, num_classes = _labels_from_context(np.load(labels_file, allow_pickle=False), labels_file)
    if len(labels) != len(pixels):
        raise DataError(f"{labels_file}: {len(labels)} labels for {len(pixels)} images in {images_file}")
    images = _to_unit_range(pixels, images_file).transpose(0, 3, 1, 2)   # NHWC -> NCHW
    images = _resize(images, image_size, images_file)
    images, labels = _check_images(images, labels, images_file)
    return images, labels, num_classes


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files
#
# IDX format: a big-endian header (2 zero bytes, a type code 0x08 = uint8, the number of
# dimensions), then one big-endian int32 per dimension, then the values, row-major.


def read_idx(path):
    """Parse an IDX file (gzipped if it ends in .gz) into a uint8 array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX type code {raw[2]:#04x} is not supported (only 0x08, unsigned bytes)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header is truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: IDX header says shape {shape} ({int(np.prod(shape))} values), "
                        f"but the file holds {data.size}")
    return data.reshape(shape)


def _find_idx(folder, stem):
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def load_idx_folder(folder, split="train", image_size=None):
    prefix = {"train": "train", "test": "t10k"}[split]
    images_file = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_file = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if images_file is None or labels_file is None:
        missing = f"{prefix}-images-idx3-ubyte" if images_file is None else f"{prefix}-labels-idx1-ubyte"
        raise DataError(f"{os.path.join(folder, missing)}[.gz]: file not found")
    pixels, labels = read_idx(images_file), read_idx(labels_file)
    if pixels.ndim != 3:
        raise DataError(f"{images_file}: images must be 3-D (N, H, W), got shape {pixels.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_file}: labels must be 1-D (N,), got shape {labels.shape}")
    if len(labels) != len(pixels):
        raise DataError(f"{labels_file}: {len(labels)} labels for {len(pixels)} images in {images_file}")
    images = _resize(_to_unit_range(pixels[:, None], images_file), image_size, images_file)
    images, labels = _check_images(images, labels.astype(np.int64), images_file)
    return images, labels, max(10, int(labels.max()) + 1)


# ---------------------------------------------------------------------------------------------
# A folder of images, one sub-folder per class

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def load_image_folder(folder, image_size=None):
    from PIL import Image
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    files, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(folder, name))):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(folder, name, f))
                labels.append(k)
    if not files:
        raise DataError(f"{folder}: no images found in sub-folders (one sub-folder per class, "
                        f"files ending in {', '.join(IMAGE_EXTENSIONS)})")
    pictures = []
    for f in files:
        try:
            with Image.open(f) as im:
                pictures.append(im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy())
        except OSError as err:
            raise DataError(f"{f}: cannot read the image ({err})") from None
    mode = "L" if all(p.mode == "L" for p in pictures) else "RGB"   # grey only if all are grey
    size = pictures[0].size if image_size is None else (image_size, image_size)
    arrays = []
    for f, p in zip(files, pictures):
        if p.size != size:
            if image_size is None:
                raise DataError(f"{f}: image is {p.size[0]}x{p.size[1]} but {files[0]} is {size[0]}x{size[1]} "
                                f"(all images must share a size, or pass --image-size)")
            p = p.resize(size, Image.BILINEAR)
        arrays.append(np.asarray(p.convert(mode), dtype=np.uint8))
    pixels = np.stack(arrays)                                     # (N, H, W) or (N, H, W, 3)
    pixels = pixels[..., None] if pixels.ndim == 3 else pixels
    images = _to_unit_range(pixels, folder).transpose(0, 3, 1, 2)
    images, labels = _check_images(images, np.array(labels), folder)
    return images, labels, len(classes)


# ---------------------------------------------------------------------------------------------
# Choosing a loader


def load_dataset(spec="digits", split="train", image_size=None):
    """(images, labels, num_classes) for 'digits' or a path; see the module docstring."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if spec == "digits":
        return load_digits(split, 16 if image_size is None else image_size)
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise DataError(f"{spec}: no such file or folder (use 'digits', a sprites .npy, "
                        f"a folder of MNIST IDX files, or a folder of class sub-folders)")
    is_sprites = (path.endswith(".npy") or
                  (os.path.isdir(path) and os.path.isfile(os.path.join(path, "sprites_1788_16x16.npy"))))
    is_idx = os.path.isdir(path) and any(f.startswith(("train-images-idx3", "t10k-images-idx3"))
                                         for f in os.listdir(path))
    if is_sprites or is_idx:
        if split == "test" and is_sprites:
            raise DataError(f"{spec}: the sprites have no test split")
        return load_sprites(path, image_size) if is_sprites else load_idx_folder(path, split, image_size)
    if os.path.isdir(path):
        if split == "test":
            raise DataError(f"{spec}: an image folder has no test split")
        return load_image_folder(path, image_size)
    raise DataError(f"{spec}: unknown data format (use 'digits', a sprites .npy, a folder of MNIST "
                    f"IDX files, or a folder of class sub-folders)")


def one_hot(labels, num_classes):
    """int64 (N,) -> float32 (N, num_classes): the course's context vectors."""
    return np.eye(num_classes, dtype=np.float32)[labels]


# ---------------------------------------------------------------------------------------------
# Batches


class Batches:
    """Endless minibatch indices, reshuffled each epoch; the incomplete last batch is dropped.

    The order of epoch e is a permutation drawn from a generator seeded with (seed, e), so the
    whole position is two integers: `state_dict()` saves them and `load_state_dict()` resumes
    at exactly the next batch an uninterrupted run would have drawn.
    """

    def __init__(self, num_items, batch_size, seed=0):
        if batch_size < 1 or batch_size > num_items:
            raise ValueError(f"batch size must be between 1 and the number of images ({num_items}), got {batch_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = None

    @property
    def batches_per_epoch(self):
        return self.num_items // self.batch_size

    def order(self):
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        return self._order

    def next(self):
        """The indices of the next batch (batch_size,)."""
        if self.position + self.batch_size > self.num_items:      # start a new epoch
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        idx = self.order()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return idx

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = None
