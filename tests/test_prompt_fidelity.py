"""Prompt fidelity (tinydiff/evaluate.py): real digits chosen by their attributes, under prompts that
do and do not match them; samples.npz with prompts; the CLI's table.

Run:  python -m pytest tests/test_prompt_fidelity.py -q
"""
import numpy as np
import pytest

from tinydiff import captions as C
from tinydiff import evaluate as E


@pytest.fixture(scope="module")
def classifier():
    return E.load_classifier()


@pytest.fixture(scope="module")
def digits():
    """The real digits in [0, 1], with each one's side of its class's training median of ink and slant."""
    train_x, train_y, test_x, test_y = E.real_digits()
    c = C.digit_captions()
    side = lambda x, y: (np.sign(C.ink(x) - c.ink_median[y]), np.sign(C.slant(x) - c.slant_median[y]))
    return dict(train=(train_x, train_y) + side(train_x, train_y), test=(test_x, test_y) + side(test_x, test_y))


def pick(digits, split, digit, ink_side=None, slant_side=None, n=None):
    x, y, ink_s, slant_s = digits[split]
    m = y == digit
    if ink_side is not None:
        m &= ink_s == ink_side
    if slant_side is not None:
        m &= slant_s == slant_side
    return x[np.flatnonzero(m)[:n]]


def prompted(groups):
    """[(prompt, images)] -> (images, labels, prompts) as `tinydiff sample` writes them."""
    images = np.concatenate([x for _, x in groups]).astype(np.float32)
    labels = np.concatenate([np.full(len(x), C.parse_prompt(p)[0], np.int64) for p, x in groups])
    prompts = np.array([p for p, x in groups for _ in range(len(x))])
    return images, labels, prompts


def rows(result):
    return {r["prompt"]: r for r in result["prompts"]}


def test_matching_attributes_score_1_and_opposite_ones_0(classifier, digits):
    thick7, thin7 = pick(digits, "train", 7, ink_side=1, n=40), pick(digits, "train", 7, ink_side=-1, n=40)
    right7, left7 = pick(digits, "train", 7, slant_side=1, n=40), pick(digits, "train", 7, slant_side=-1, n=40)
    result = E.prompt_fidelity(*prompted([("a thick 7", thick7), ("a thin seven", thick7),
                                          ("7, leaning right", right7), ("the digit 7, slanted left", right7),
                                          ("a bold 7 tilted left", left7), ("a light 7 slanted right", thin7)]),
                               classifier=classifier)
    r = rows(result)
    assert r["a thick 7"]["weight"] == 1.0 and r["a thin seven"]["weight"] == 0.0
    assert r["7, leaning right"]["slant"] == 1.0 and r["the digit 7, slanted left"]["slant"] == 0.0
    assert r["a bold 7 tilted left"]["slant"] == 1.0 and r["a light 7 slanted right"]["weight"] == 1.0
    assert r["a thick 7"]["slant"] is None and r["7, leaning right"]["weight"] is None    # not asked for
    assert all(row["accuracy"] > 0.9 for row in result["prompts"])                         # they are 7s
    # pooled over the prompts: weight asked 4 times (1, 0, ~, 1) with 40 samples each
    asked = [(r["a thick 7"], 1.0), (r["a thin seven"], 0.0)]
    assert all(row["n"] == 40 for row, _ in asked)
    assert 0 < result["overall"]["weight"] < 1 and result["held_out"] is None


def test_held_out_digits_of_the_test_split_on_the_right_side(classifier, digits):
    thick3, thin3 = pick(digits, "test", 3, ink_side=1), pick(digits, "test", 3, ink_side=-1)
    right2 = pick(digits, "test", 2, slant_side=1)
    result = E.prompt_fidelity(*prompted([("a thick 3", thick3), ("a thick 3 ", thin3),
                                          ("two, slanted right", right2), ("a thick 7", pick(digits, "test", 7, 1))]),
                               classifier=classifier)
    r = rows(result)
    assert r["a thick 3"]["held_out"] and r["two, slanted right"]["held_out"] and not r["a thick 7"]["held_out"]
    assert r["a thick 3"]["weight"] == 1.0 and r["a thick 3 "]["weight"] == 0.0 and r["two, slanted right"]["slant"] == 1.0
    held = result["held_out"]
    assert held["n"] == len(thick3) + len(thin3) + len(right2)
    assert held["weight"] == pytest.approx(len(thick3) / (len(thick3) + len(thin3)))
    assert result["overall"]["n"] == r["a thick 7"]["n"] and result["overall"]["weight"] == 1.0


def test_class_accuracy_leaves_out_unnamed_prompts_and_catches_wrong_digits(classifier, digits):
    x, y = digits["test"][:2]
    result = E.prompt_fidelity(*prompted([("3", x[y == 3]), ("a 5", x[y == 3]), ("something thick", x[y == 1]),
                                          ("", x[y == 4])]), classifier=classifier)
    r = rows(result)
    assert r["3"]["accuracy"] > 0.9 and r["a 5"]["accuracy"] < 0.1
    assert r["something thick"]["accuracy"] is None and r[""]["accuracy"] is None
    n3 = (y == 3).sum()
    assert result["overall"]["accuracy"] == pytest.approx((r["3"]["accuracy"] + r["a 5"]["accuracy"]) / 2)
    assert result["overall"]["n"] == 2 * n3 + (y == 1).sum() + (y == 4).sum()
    # an unnamed prompt's attribute is judged against the class the classifier sees
    assert 0.2 < r["something thick"]["weight"] < 0.8


def test_frechet_for_class_only_prompts_only(classifier, digits):
    x, y = digits["test"][:2]
    result = E.prompt_fidelity(*prompted([("7", x[y == 7]), ("seven", x[y == 7]), ("a thick 1", x[y == 1])]),
                               classifier=classifier)
    r = rows(result)
    assert r["7"]["frechet"] == pytest.approx(0, abs=1e-6)              # the reference digits themselves
    assert r["7"]["floor"] > 0 and r["7"]["ratio"] == pytest.approx(0, abs=1e-6)
    assert r["a thick 1"]["frechet"] is None
    pooled = result["class_only"]
    assert pooled["n"] == 2 * (y == 7).sum() and pooled["frechet"] < pooled["floor"]
    noise = np.random.default_rng(0).random((60, 1, 16, 16)).astype(np.float32)
    bad = E.prompt_fidelity(*prompted([("7", noise)]), classifier=classifier)
    assert bad["class_only"]["ratio"] > 10 and bad["overall"]["accuracy"] < 0.5


def test_the_table_names_every_prompt_and_summary(classifier, digits):
    x, y = digits["test"][:2]
    result = E.prompt_fidelity(*prompted([("7", x[y == 7]), ("a thin 8", x[y == 8])]), classifier=classifier)
    table = E.format_fidelity(result, name="run/samples.npz")
    assert "run/samples.npz" in table and "'7'" in table and "'a thin 8'  (held out)" in table
    assert "the held-out combinations" in table and "class-only prompts, pooled" in table
    assert f"{rows(result)['7']['accuracy']:.1%}" in table


def write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_load_samples_reads_prompts_and_label_only_files(tmp_path, digits):
    images, labels, prompts = prompted([("a 3", digits["test"][0][:4]), ("", digits["test"][0][4:6])])
    assert prompts.dtype.kind == "U" and labels.tolist() == [3] * 4 + [-1] * 2
    x, y, p = E.load_samples(write(tmp_path / "text.npz", images=images, labels=labels, prompts=prompts))
    assert p.tolist() == prompts.tolist() and y.tolist() == labels.tolist()
    x, y, p = E.load_samples(write(tmp_path / "labels.npz", images=images, labels=np.abs(labels)))
    assert p is None and len(x) == 6


def test_load_samples_refuses_bad_prompts(tmp_path, digits):
    images, labels, prompts = prompted([("a 3", digits["test"][0][:4]), ("", digits["test"][0][4:6])])
    with pytest.raises(ValueError, match="no_pickle.npz: not a readable"):          # object arrays need pickle
        E.load_samples(write(tmp_path / "no_pickle.npz", images=images, labels=labels,
                             prompts=prompts.astype(object)))
    with pytest.raises(TypeError, match="fixed-width unicode"):
        E.load_samples(write(tmp_path / "bytes.npz", images=images, labels=labels, prompts=prompts.astype("S")))
    with pytest.raises(ValueError, match=r"'a 3' names digit 3, but its images have labels \[5\]"):
        E.load_samples(write(tmp_path / "wrong.npz", images=images, labels=np.where(labels == 3, 5, -1),
                             prompts=prompts))
    with pytest.raises(ValueError, match="one per image"):
        E.load_samples(write(tmp_path / "short.npz", images=images, labels=labels, prompts=prompts[:3]))
    with pytest.raises(ValueError, match="0..9"):              # -1 only where prompts say why
        E.load_samples(write(tmp_path / "minus.npz", images=images, labels=labels))


def test_cli_eval_reports_fidelity_beside_accuracy_and_distance(tmp_path, capsys, digits):
    cli = pytest.importorskip("tinydiff.cli")
    x, y = digits["test"][:2]
    path = write(tmp_path / "samples.npz", **dict(zip(("images", "labels", "prompts"),
                                                      prompted([("7", x[y == 7]), ("a thick 3", x[y == 3]),
                                                                ("", x[y == 1])]))))
    assert cli.main(["eval", "--samples", path]) == 0
    out = capsys.readouterr().out
    assert "conditional accuracy" in out and "(the prompts naming a digit)" in out and "60 samples" in out
    assert "prompt fidelity" in out and "'a thick 3'  (held out)" in out and "''" in out
