"""Captions derived from the digits: the attributes on images whose ink and slant are known, the
per-class thirds, the held-out combinations, the vocabulary, parse_prompt, reproducibility.

Run:  python -m pytest tests/test_captions.py -q
"""
import itertools

import numpy as np
import pytest

from tinydiff.captions import (DIGIT_WORDS, HELD_OUT, SYNONYMS, TEMPLATES, DigitCaptions, caption_vocabulary,
                               digit_captions, ink, parse_prompt, slant, split_words)


def sheared_bar(shear, width=2, height=12, size=16, value=1.0):
    """A vertical bar whose column moves by `shear` pixels per row going UP: top leans right for shear > 0."""
    img = np.zeros((1, 1, size, size))
    top = (size - height) // 2
    for y in range(top, top + height):
        x = int(round(size / 2 + shear * ((top + height / 2) - y)))
        img[0, 0, y, x:x + width] = value
    return img


@pytest.fixture(scope="module")
def captions():
    return digit_captions()


def test_slant_of_two_points_is_the_formula():
    # pixels (y=2, x=10) and (y=12, x=4): centroid (7, 7), mu11 = (3*-5 + -3*5)/2 = -15, mu02 = 25
    img = np.zeros((1, 1, 16, 16))
    img[0, 0, 2, 10] = img[0, 0, 12, 4] = 1.0
    assert slant(img)[0] == pytest.approx(15 / 25, abs=1e-12)      # top to the right: positive
    assert slant(img[:, :, ::-1].copy())[0] == pytest.approx(-15 / 25, abs=1e-12)   # flipped upside down


@pytest.mark.parametrize("shear", [-0.5, -0.25, 0.25, 0.5])
def test_a_sheared_bar_leans_the_way_it_was_sheared(shear):
    s = slant(sheared_bar(shear))[0]
    assert np.sign(s) == np.sign(shear), (shear, s)
    assert s == pytest.approx(shear, abs=0.08), (shear, s)


def test_an_upright_bar_and_a_blank_image_have_no_slant():
    assert slant(sheared_bar(0.0))[0] == pytest.approx(0.0, abs=1e-12)
    assert slant(np.zeros((1, 1, 16, 16)))[0] == 0.0


def test_ink_is_the_mean_pixel_thick_above_thin():
    thick, thin = sheared_bar(0.0, width=3), sheared_bar(0.0, width=1)
    assert ink(thick)[0] == pytest.approx(36 / 256) and ink(thin)[0] == pytest.approx(12 / 256)
    half = np.full((2, 1, 16, 16), 0.5)
    np.testing.assert_allclose(ink(half), [0.5, 0.5])


def test_images_outside_0_1_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
        ink(np.full((1, 1, 16, 16), -1.0))
    with pytest.raises(ValueError, match="shape"):
        slant(np.zeros((16, 16)))


def constructed_set():
    """Each class k: 9 bars of widths 1..3 (thin to thick) and shears -0.4..0.4, in grey 0.5 + 0.05 k,
    so that the thirds differ from class to class."""
    images, labels = [], []
    for k in range(10):
        for width, shear in itertools.product((1, 2, 3), (-0.4, 0.0, 0.4)):
            images.append(sheared_bar(shear, width=width, value=0.5 + 0.05 * k))
            labels.append(k)
    return np.concatenate(images), np.array(labels)


def test_thirds_are_per_class_and_sort_thick_thin_left_right():
    images, labels = constructed_set()
    c = DigitCaptions(images, labels)
    for k in range(10):
        members = labels == k
        np.testing.assert_allclose(c.ink_thirds[k], np.quantile(ink(images[members]), [1 / 3, 2 / 3]))
        np.testing.assert_allclose(c.slant_thirds[k], np.quantile(slant(images[members]), [1 / 3, 2 / 3]))
        np.testing.assert_allclose(c.slant_median[k], np.median(slant(images[members])))
        np.testing.assert_allclose(c.ink_median[k], np.median(ink(images[members])))
    assert len(np.unique(c.ink_thirds[:, 0])) == 10                      # the classes differ
    widths = np.tile(np.repeat([1, 2, 3], 3), 10)
    shears = np.tile([-0.4, 0.0, 0.4], 30)
    np.testing.assert_array_equal(c.weight, np.select([widths == 1, widths == 3], [-1, 1], 0))
    np.testing.assert_array_equal(c.lean, np.select([shears < 0, shears > 0], [-1, 1], 0))
    weight, lean = c.attributes(images, labels)                          # the same, on any images
    np.testing.assert_array_equal(weight, c.weight)
    np.testing.assert_array_equal(lean, c.lean)


def test_a_class_without_images_is_refused():
    images, labels = constructed_set()
    with pytest.raises(ValueError, match=r"no images of digit\(s\) \[9\]"):
        DigitCaptions(images[labels < 9], labels[labels < 9])


def test_training_digits_split_into_thirds(captions):
    for k in range(10):
        counts = np.bincount(captions.weight[captions.labels == k] + 1, minlength=3)
        assert counts.min() >= counts.sum() // 3 - 2, (k, counts)
    assert captions.slant_median[7] > 0 > captions.slant_median[6]      # 7s lean right here, 6s left


def draws(captions, n_draws=20):
    rng = np.random.default_rng(1)
    idx = np.arange(len(captions.labels))
    return [(int(captions.labels[i]), text) for _ in range(n_draws)
            for i, text in zip(idx, captions.captions(idx, rng))]


def test_held_out_combinations_never_appear_but_the_others_do(captions):
    seen = {(parse_prompt(text)[0], axis, sign)
            for label, text in draws(captions)
            for axis, sign in zip(("weight", "lean"), parse_prompt(text)[1:]) if sign != 0}
    for digit, word in HELD_OUT:
        axis, sign = {"thick": ("weight", 1), "thin": ("weight", -1),
                      "slanted left": ("lean", -1), "slanted right": ("lean", 1)}[word]
        assert (digit, axis, sign) not in seen, (digit, word)
        assert (digit, axis, -sign) in seen, (digit, word)               # the opposite is named
        assert ((digit + 1) % 10, axis, sign) in seen                    # and other digits have it
    assert len(seen) == 10 * 4 - 4


def test_every_caption_names_its_digit_and_only_true_attributes(captions):
    for (label, text), i in zip(draws(captions, 3), itertools.cycle(range(len(captions.labels)))):
        digit, weight, lean = parse_prompt(text)
        assert digit == label == captions.labels[i], text
        assert weight in (0, captions.weight[i]) and lean in (0, captions.lean[i]), (text, i)


def test_every_caption_word_is_in_the_vocabulary(captions):
    vocabulary = set(caption_vocabulary())
    assert caption_vocabulary() == sorted(vocabulary)
    words = {w for _, text in draws(captions, 5) for w in split_words(text)}
    assert words <= vocabulary, words - vocabulary
    assert vocabulary == words, vocabulary - words                       # and no word they never use
    assert {"thick", "bold", "heavy", "thin", "light", "fine", "seven", "7", ","} <= vocabulary


def every_template_output():
    """(text, digit, weight, lean) for every template, synonym and digit form."""
    for names, templates in TEMPLATES.items():
        choices = [[(s, p) for (a, s), ps in SYNONYMS.items() if a == axis for p in ps] for axis in names]
        for template, digit, form in itertools.product(templates, range(10), ("numeral", "word")):
            for picked in itertools.product(*choices):
                found = {axis: sign for axis, (sign, _) in zip(names, picked)}
                text = template.format(digit=str(digit) if form == "numeral" else DIGIT_WORDS[digit],
                                       **{axis: phrase for axis, (_, phrase) in zip(names, picked)})
                yield text, digit, found.get("weight", 0), found.get("lean", 0)


def test_parse_prompt_recovers_every_template():
    outputs = list(every_template_output())
    assert len(outputs) > 1000
    for text, digit, weight, lean in outputs:
        assert parse_prompt(text) == (digit, weight, lean), text


def test_parse_prompt_of_prompts_without_a_digit():
    assert parse_prompt("") == (-1, 0, 0)
    assert parse_prompt("something thick, leaning left") == (-1, 1, -1)
    assert parse_prompt("a zebra") == (-1, 0, 0)
    assert parse_prompt("A THICK Seven!") == (7, 1, 0)
    assert parse_prompt("the digit 12") == (-1, 0, 0)                   # not a digit


def test_the_same_seed_gives_the_same_captions(captions):
    idx = np.arange(200)
    a = captions.captions(idx, np.random.default_rng(5))
    b = captions.captions(idx, np.random.default_rng(5))
    c = captions.captions(idx, np.random.default_rng(6))
    assert a == b and a != c
    rng = np.random.default_rng(5)
    assert captions.captions(idx, rng) != captions.captions(idx, rng)   # each call draws anew
    assert len(set(captions.captions(np.zeros(200, dtype=int), rng))) > 10   # one image, many phrasings


def test_eight_takes_an():
    rng = np.random.default_rng(0)
    texts = {DigitCaptions.caption(8, 0, 0, rng) for _ in range(200)}
    assert "an 8" in texts and "an eight" in texts and not any(t.startswith("a 8") for t in texts)
