"""A word-level tokenizer: prompts -> integer ids for the text encoder (tinydiff/text_encoder.py).

    tok = Tokenizer(["a", "thick", "seven", "7"], max_tokens=16)
    tok.encode(["a thick 7", ""])      # [[1, 3, 4, 6, 0, ...], [1, 0, 0, ...]]   (B, max_tokens + 1) int64
    tok.decode(ids)                    # ["a thick 7", ""]

A prompt is lower-cased and split into words and single punctuation marks ("Thick, 7!" -> "thick",
",", "7", "!"). Each becomes its index in the vocabulary, which starts with three special tokens:
    PAD = 0   fills the row after the prompt (the encoder's attention masks it out)
    BOS = 1   begins every row; the empty prompt "" is BOS alone (the null prompt of guidance)
    UNK = 2   a word the vocabulary lacks (named in a warning, never silently dropped)
No byte pairs and no learned merges: the vocabulary is the words the captions' templates use.
"""
import re
import warnings

import numpy as np

PAD, BOS, UNK = 0, 1, 2
SPECIAL = ("<pad>", "<bos>", "<unk>")
WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")   # a run of a-z/0-9, or one other mark (as captions.py splits)


class Tokenizer:
    def __init__(self, words, max_tokens=16):
        words = list(words)
        for w in words:
            if not isinstance(w, str) or self.split(w) != [w] or w in SPECIAL:
                raise ValueError(f"Tokenizer: {w!r} is not one lower-case word or punctuation mark")
        if len(set(words)) != len(words):
            raise ValueError(f"Tokenizer: the vocabulary repeats words: "
                             f"{sorted({w for w in words if words.count(w) > 1})}")
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ValueError(f"Tokenizer: max_tokens must be a positive int, got {max_tokens!r}")
        self.words, self.max_tokens = words, max_tokens
        self.vocab = list(SPECIAL) + words                       # id -> token
        self.ids = {w: i for i, w in enumerate(self.vocab)}      # token -> id

    def __len__(self):
        return len(self.vocab)

    @staticmethod
    def split(text):
        """'A thick 7, please' -> ['a', 'thick', '7', ',', 'please']."""
        return WORD.findall(text.lower())

    def encode(self, prompts):
        """A list of B prompts -> int64 (B, max_tokens + 1): BOS, the word ids, then PAD."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"Tokenizer.encode: pass a list of prompts (strings), got {type(prompts).__name__}")
        ids = np.full((len(prompts), self.max_tokens + 1), PAD, dtype=np.int64)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"Tokenizer.encode: prompt {i} is a {type(prompt).__name__}, not a string: {prompt!r}")
            words = self.split(prompt)
            if len(words) > self.max_tokens:
                raise ValueError(f"Tokenizer.encode: prompt {i} has {len(words)} tokens, more than the "
                                 f"{self.max_tokens} the model reads: {prompt!r}")
            for w in words:
                if w not in self.ids:
                    warnings.warn(f"Tokenizer: unknown word {w!r} in prompt {prompt!r}, encoded as <unk>",
                                  stacklevel=2)
            ids[i, 0] = BOS
            ids[i, 1:1 + len(words)] = [self.ids.get(w, UNK) for w in words]
        return ids

    def decode(self, ids):
        """(B, L) ids -> B prompts: the words joined by spaces (BOS and PAD left out, UNK as <unk>)."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or (ids.size and (ids.min() < 0 or ids.max() >= len(self))):
            raise ValueError(f"Tokenizer.decode: ids must be (B, L) integers in [0, {len(self)}), "
                             f"got shape {ids.shape} dtype {ids.dtype}")
        return [" ".join(self.vocab[i] for i in row if i not in (PAD, BOS)) for row in ids.tolist()]

    def to_dict(self):
        """JSON-safe: what from_dict needs to rebuild this tokenizer exactly."""
        return {"words": list(self.words), "max_tokens": self.max_tokens}

    @classmethod
    def from_dict(cls, d):
        return cls(d["words"], d["max_tokens"])
