"""Data loaders: shapes, ranges, the digits split, the bilinear resize, IDX/npy/PNG files, refusals."""
import gzip
import os
import struct

import numpy as np
import pytest

from tinydiff import data
from tinydiff.data import DataError, Batches, interpolate_bilinear, load_dataset


def test_bilinear_hand_computed():
    # one row [0, 4]: PyTorch (align_corners=False, x2) gives [0, 1, 3, 4]:
    # output i samples src = (i + 0.5)/2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (-> 1)
    x = np.array([[0.0, 4.0], [8.0, 12.0]]).reshape(1, 1, 2, 2)
    out = interpolate_bilinear(x, 2)[0, 0]
    row0 = [0, 1, 3, 4]
    row3 = [8, 9, 11, 12]
    expected = np.array([row0, [2, 3, 5, 6], [6, 7, 9, 10], row3], dtype=np.float64)
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_bilinear_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 8))
    for s in (2, 3):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=s, mode="bilinear",
                                              align_corners=False).numpy()
        np.testing.assert_allclose(interpolate_bilinear(x, s), ref, atol=1e-12)


def test_digits_split():
    train, y_train, k = load_dataset("digits")
    test, y_test, _ = load_dataset("digits", split="test")
    assert k == 10
    assert train.shape == (1497, 1, 16, 16) and test.shape == (300, 1, 16, 16)
    assert train.dtype == np.float32 and y_train.dtype == np.int64
    assert train.min() == -1.0 and train.max() == 1.0
    assert np.bincount(y_test).tolist() == [30] * 10          # stratified
    tr_idx, te_idx = data.digits_split_indices()
    assert len(np.intersect1d(tr_idx, te_idx)) == 0 and len(tr_idx) + len(te_idx) == 1797
    # the 16x16 digit is the 2x bilinear resize of the 8x8 one, mapped 0..16 -> [-1, 1]
    from sklearn.datasets import load_digits
    raw = load_digits().images[te_idx[:5]][:, None] / 8 - 1
    np.testing.assert_allclose(test[:5], interpolate_bilinear(raw, 2), atol=1e-6)


def _write_idx(path, array, gz=False):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder(tmp_path, gz):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5, 9], dtype=np.uint8)
    ext = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", pixels, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", labels, gz)
    images, y, k = load_dataset(str(tmp_path))
    assert images.shape == (7, 1, 28, 28) and images.dtype == np.float32 and k == 10
    np.testing.assert_allclose(images[:, 0], pixels / 127.5 - 1, atol=1e-6)
    assert y.tolist() == labels.tolist() and y.dtype == np.int64
    small, _, _ = load_dataset(str(tmp_path), image_size=16)
    assert small.shape == (7, 1, 16, 16)
    padded = np.pad(pixels / 127.5 - 1, ((0, 0), (2, 2), (2, 2)), constant_values=-1)
    np.testing.assert_allclose(small[3, 0, 5, 6], padded[3, 10:12, 12:14].mean(), atol=1e-6)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset(str(tmp_path), split="test")


def test_idx_refusals(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 4, 4)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: 4 labels for 5 images"):
        load_dataset(str(tmp_path))
    with open(tmp_path / "train-labels-idx1-ubyte", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">i", 5) + bytes(3))   # says 5, holds 3
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: IDX header says shape"):
        load_dataset(str(tmp_path))
    with open(tmp_path / "train-labels-idx1-ubyte", "wb") as f:
        f.write(b"\x12\x34\x08\x01")
    with pytest.raises(DataError, match="bad magic"):
        load_dataset(str(tmp_path))


def _write_sprites(folder, images, labels):
    np.save(os.path.join(folder, "sprites_1788_16x16.npy"), images)
    np.save(os.path.join(folder, "sprite_labels_nc_1788_16x16.npy"), labels)


def test_sprites(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    labels = np.eye(5)[[0, 1, 2, 3, 4, 0]]
    _write_sprites(tmp_path, pixels, labels)
    for spec in (str(tmp_path), str(tmp_path / "sprites_1788_16x16.npy")):
        images, y, k = load_dataset(spec)
        assert images.shape == (6, 3, 16, 16) and images.dtype == np.float32 and k == 5
        assert y.tolist() == [0, 1, 2, 3, 4, 0]
        np.testing.assert_allclose(images, pixels.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)
    # float images in [0, 1] are accepted and scaled the same way
    _write_sprites(tmp_path, pixels / 255.0, labels)
    np.testing.assert_allclose(load_dataset(str(tmp_path))[0], images, atol=1e-6)


def test_sprites_refusals(tmp_path):
    good = np.zeros((6, 16, 16, 3), dtype=np.uint8)
    onehot = np.eye(5)[[0, 1, 2, 3, 4, 0]]
    _write_sprites(tmp_path, good, onehot[:5])
    with pytest.raises(DataError, match=r"sprite_labels_nc_1788_16x16.npy: 5 labels for 6 images"):
        load_dataset(str(tmp_path))
    _write_sprites(tmp_path, good[..., 0], onehot)
    with pytest.raises(DataError, match=r"sprites_1788_16x16.npy: sprites must be \(N, H, W, 3\)"):
        load_dataset(str(tmp_path))
    _write_sprites(tmp_path, good.astype(np.float32) - 3, onehot)
    with pytest.raises(DataError, match=r"sprites_1788_16x16.npy: float images must be in \[0, 1\]"):
        load_dataset(str(tmp_path))
    _write_sprites(tmp_path, good, onehot * 0.5)
    with pytest.raises(DataError, match="must be one-hot rows, row 0"):
        load_dataset(str(tmp_path))
    os.remove(tmp_path / "sprite_labels_nc_1788_16x16.npy")
    with pytest.raises(DataError, match="sprite_labels_nc_1788_16x16.npy: file not found"):
        load_dataset(str(tmp_path / "sprites_1788_16x16.npy"))


def test_image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(3)
    saved = {}
    for cls, count in (("cat", 2), ("dog", 3)):
        os.makedirs(tmp_path / cls)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
            saved[(cls, i)] = pixels
    images, y, k = load_dataset(str(tmp_path))
    assert images.shape == (5, 1, 8, 8) and k == 2 and y.tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_allclose(images[2, 0], saved[("dog", 0)] / 127.5 - 1, atol=1e-6)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "dog" / "odd.png")
    with pytest.raises(DataError, match=r"odd.png: image is 4x4"):
        load_dataset(str(tmp_path))
    assert load_dataset(str(tmp_path), image_size=8)[0].shape == (6, 1, 8, 8)


def test_unknown_and_missing(tmp_path):
    with pytest.raises(DataError, match="nope: no such file or folder"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="x.txt: unknown data format"):
        load_dataset(str(tmp_path / "x.txt"))
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(DataError, match="no images found"):
        load_dataset(str(tmp_path / "empty"))


def test_batches_resume_exactly():
    full = Batches(10, 3, seed=5)
    reference = [full.next() for _ in range(8)]              # 3 batches per epoch, crosses epochs
    assert all(len(b) == 3 for b in reference)
    assert len(set(np.concatenate(reference[:3]).tolist())) == 9  # no repeats within an epoch
    part = Batches(10, 3, seed=5)
    for _ in range(4):
        part.next()
    state = part.state_dict()
    resumed = Batches(10, 3, seed=0)
    resumed.load_state_dict(state)
    for want in reference[4:]:
        np.testing.assert_array_equal(resumed.next(), want)
    assert not np.array_equal(reference[0], Batches(10, 3, seed=6).next())
    with pytest.raises(ValueError, match="batch size"):
        Batches(10, 11)
