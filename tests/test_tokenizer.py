"""The word-level tokenizer (tinydiff/tokenizer.py): round trip, special tokens, refusals.

Run:  python -m pytest tests/test_tokenizer.py -q
"""
import json
import warnings

import numpy as np
import pytest

from tinydiff.tokenizer import BOS, PAD, UNK, Tokenizer

WORDS = ["a", "thick", "thin", "seven", "7", "digit", "the", ",", "slanted", "right"]


def test_round_trip():
    tok = Tokenizer(WORDS, max_tokens=8)
    prompts = ["a thick seven", "The digit 7, slanted right", "7"]
    ids = tok.encode(prompts)
    assert ids.shape == (3, 9) and ids.dtype == np.int64
    assert tok.decode(ids) == ["a thick seven", "the digit 7 , slanted right", "7"]
    assert ids[0].tolist() == [BOS, 3, 4, 6, PAD, PAD, PAD, PAD, PAD]     # ids follow PAD, BOS, UNK


def test_empty_prompt_is_bos_only():
    ids = Tokenizer(WORDS).encode(["", "   "])
    assert ids.shape == (2, 17)
    assert ids[:, 0].tolist() == [BOS, BOS] and not ids[:, 1:].any()


def test_punctuation_is_split_off_and_case_lowered():
    assert Tokenizer.split("Thick,7! (slanted)") == ["thick", ",", "7", "!", "(", "slanted", ")"]
    assert Tokenizer.split("snake_case café") == ["snake", "_", "case", "caf", "é"]   # only a-z, 0-9 join


def test_unknown_word_is_named_and_encoded_unk():
    tok = Tokenizer(WORDS)
    with pytest.warns(UserWarning, match="unknown word 'purple'"):
        ids = tok.encode(["a purple seven"])
    assert ids[0, :4].tolist() == [BOS, tok.ids["a"], UNK, tok.ids["seven"]]
    assert tok.decode(ids) == ["a <unk> seven"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # known words: no warning at all
        tok.encode(["a thick seven"])


def test_too_long_prompt_is_refused_with_its_length():
    tok = Tokenizer(WORDS, max_tokens=4)
    tok.encode(["a a a a"])                                 # exactly max_tokens: fits
    with pytest.raises(ValueError, match="prompt 1 has 5 tokens, more than the 4"):
        tok.encode(["7", "a thick seven , 7"])


def test_to_dict_round_trip_through_json():
    tok = Tokenizer(WORDS, max_tokens=5)
    again = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.vocab == tok.vocab and again.max_tokens == 5
    prompts = ["the digit 7 , thin", "seven"]
    np.testing.assert_array_equal(again.encode(prompts), tok.encode(prompts))


@pytest.mark.parametrize("bad, match", [
    ("a thick seven", "pass a list of prompts"),            # one string, not a list
    (None, "pass a list of prompts"),
    (["7", 7], "prompt 1 is a int, not a string"),
    ([b"seven"], "prompt 0 is a bytes"),
])
def test_bad_prompts_are_refused(bad, match):
    with pytest.raises(TypeError, match=match):
        Tokenizer(WORDS).encode(bad)


@pytest.mark.parametrize("words, match", [
    (["Thick"], "not one lower-case word"),
    (["two words"], "not one lower-case word"),
    (["<pad>"], "not one lower-case word"),
    ([7], "not one lower-case word"),
    (["a", "b", "a"], r"repeats words: \['a'\]"),
])
def test_bad_vocabulary_is_refused(words, match):
    with pytest.raises(ValueError, match=match):
        Tokenizer(words)


def test_decode_refuses_ids_out_of_range():
    tok = Tokenizer(WORDS)
    with pytest.raises(ValueError, match="integers in"):
        tok.decode(np.array([[1, len(tok)]]))
