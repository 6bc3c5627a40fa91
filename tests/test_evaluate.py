"""The evaluation: the shipped classifier, the Frechet distance, the floor, and refusals."""
import numpy as np
import pytest

from tinydiff import data
from tinydiff import evaluate as E


@pytest.fixture(scope="module")
def classifier():
    return E.load_classifier()


@pytest.fixture(scope="module")
def test_digits():
    _, _, test_x, test_y = E.real_digits()
    return test_x, test_y


# --- the Frechet distance itself -------------------------------------------------------------


def test_frechet_matches_closed_forms():
    # 1-D: (mu1 - mu2)^2 + (sigma1 - sigma2)^2
    d = E.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert d == pytest.approx(9 + (2 - 3) ** 2)
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])
    d = E.frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b))
    assert d == pytest.approx(3 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def test_frechet_matches_scipy_sqrtm_on_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 6, 6))
    s1, s2 = a @ a.T, b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.standard_normal((2, 6))
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert E.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert E.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(E.frechet_distance(mu2, s2, mu1, s1), rel=1e-6)


def test_sqrtm_psd_squares_back_even_when_singular():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((8, 3))
    s = a @ a.T                                   # rank 3: five eigenvalues are ~0 (some slightly < 0)
    r = E.sqrtm_psd(s)
    np.testing.assert_allclose(r @ r, s, atol=1e-10)
    np.testing.assert_allclose(r, r.T, atol=1e-12)


# --- the classifier on real and broken digits ------------------------------------------------


def test_split_is_the_diffusion_training_split(test_digits):
    train_idx, test_idx = data.digits_split_indices()
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    test_x, test_y = test_digits
    assert test_x.shape == (len(test_idx), 1, 16, 16) and 0 <= test_x.min() and test_x.max() <= 1
    ref_x, ref_y, _ = data.load_digits("test")
    np.testing.assert_allclose(test_x, (ref_x + 1) / 2, atol=1e-6)
    np.testing.assert_array_equal(test_y, ref_y)


def test_held_out_digits_score_high_accuracy_and_zero_distance(classifier, test_digits):
    test_x, test_y = test_digits
    result = E.evaluate(test_x, test_y, classifier=classifier)
    assert result["accuracy"] > 0.95
    assert result["frechet"] == pytest.approx(0, abs=1e-6)     # the reference set itself
    assert result["floor"] > 0 and result["n_reference"] == len(test_x)
    # real training digits, as many as the samples, land near the floor (they ARE the floor's kind)
    train_x, train_y, _, _ = E.real_digits()
    pick = np.random.default_rng(5).permutation(len(train_x))[:300]
    result = E.evaluate(train_x[pick], train_y[pick], classifier=classifier)
    assert result["accuracy"] > 0.95
    assert 0.6 < result["ratio"] < 1.5


def test_pure_noise_scores_low_accuracy_and_far_distance(classifier):
    rng = np.random.default_rng(0)
    images = rng.random((300, 1, 16, 16)).astype(np.float32)
    labels = np.repeat(np.arange(10), 30)
    result = E.evaluate(images, labels, classifier=classifier)
    assert result["accuracy"] < 0.3
    assert result["ratio"] > 10


def test_distance_grows_monotonically_with_added_noise(classifier, test_digits):
    test_x, test_y = test_digits
    rng = np.random.default_rng(3)
    noise = rng.standard_normal(test_x.shape).astype(np.float32)
    distances = [E.evaluate(np.clip(test_x + s * noise, 0, 1), test_y, classifier=classifier)["frechet"]
                 for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert distances[0] == pytest.approx(0, abs=1e-6)
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_per_class_and_reference_follow_the_sample_labels(classifier, test_digits):
    test_x, test_y = test_digits
    keep = np.isin(test_y, [3, 7])
    result = E.evaluate(test_x[keep], test_y[keep], classifier=classifier)
    assert sorted(result["per_class"]) == [3, 7]
    assert result["n_reference"] == keep.sum()
    assert result["frechet"] == pytest.approx(0, abs=1e-6)
    # the right images under the wrong labels: accuracy collapses
    wrong = E.evaluate(test_x[keep], np.where(test_y[keep] == 3, 7, 3), classifier=classifier)
    assert wrong["accuracy"] < 0.05


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((4, 16, 16), np.float32), np.zeros(4, np.int64), "shape"),
    (np.zeros((4, 3, 16, 16), np.float32), np.zeros(4, np.int64), "shape"),
    (np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64), "shape"),
    (np.zeros((4, 1, 16, 16), np.uint8), np.zeros(4, np.int64), "dtype"),
    (np.full((4, 1, 16, 16), -0.5, np.float32), np.zeros(4, np.int64), "[0, 1]"),
    (np.full((4, 1, 16, 16), 255.0, np.float32), np.zeros(4, np.int64), "[0, 1]"),
    (np.full((4, 1, 16, 16), np.nan, np.float32), np.zeros(4, np.int64), "NaN"),
    (np.zeros((4, 1, 16, 16), np.float32), None, "no labels"),
    (np.zeros((4, 1, 16, 16), np.float32), np.zeros(3, np.int64), "one label per image"),
    (np.zeros((4, 1, 16, 16), np.float32), np.zeros(4, np.float32), "integers"),
    (np.zeros((4, 1, 16, 16), np.float32), np.full(4, 10), "0..9"),
])
def test_bad_samples_are_refused_with_the_file_name(images, labels, message):
    with pytest.raises((ValueError, TypeError)) as err:
        E.check_samples(images, labels, name="run/samples.npz")
    assert "run/samples.npz" in str(err.value) and message in str(err.value)


def test_load_samples_refuses_bad_files(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        E.load_samples(str(missing))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="garbage.npz"):
        E.load_samples(str(garbage))
    no_images = tmp_path / "no_images.npz"
    np.savez(no_images, pictures=np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="no 'images'"):
        E.load_samples(str(no_images))
    no_labels = tmp_path / "no_labels.npz"
    np.savez(no_labels, images=np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="no_labels.npz: no labels"):
        E.load_samples(str(no_labels))


def test_cli_eval_prints_the_scores(tmp_path, capsys, test_digits):
    cli = pytest.importorskip("tinydiff.cli")
    test_x, test_y = test_digits
    path = tmp_path / "samples.npz"
    np.savez(path, images=test_x[:100], labels=test_y[:100].astype(np.int64))
    assert cli.main(["eval", "--samples", str(path)]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "conditional accuracy" in out and "floor" in out and "ratio" in out
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=test_x[:10] * 255, labels=test_y[:10])
    assert cli.main(["eval", "--samples", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "bad.npz" in err and "[0, 1]" in err


# --- the shipped weights and the script that made them -----------------------------------------


def test_shipped_classifier_records_its_recipe_and_accuracy(classifier, test_digits):
    from tinydiff.checkpoint import read_safetensors
    _, meta = read_safetensors(E.CLASSIFIER_FILE)
    assert meta["script"] == "scripts/train_digits_classifier.py" and meta["seed"] == "0"
    assert int(meta["train_digits"]) == len(data.digits_split_indices()[0])
    test_x, test_y = test_digits
    measured = (E.classify(classifier, test_x)[0].argmax(axis=1) == test_y).mean()
    assert measured >= 0.97 and abs(measured - float(meta["test_accuracy"])) < 1e-3


def test_training_script_refuses_to_ship_a_weak_classifier(tmp_path):
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("train_clf", os.path.join(root, "scripts", "train_digits_classifier.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "weak.safetensors"
    with pytest.raises(SystemExit, match="below 97%"):        # one epoch is not enough
        script.main(["--epochs", "1", "--out", str(out)])
    assert not out.exists()
