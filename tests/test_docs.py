"""Every ```python block of README.md and docs/*.md runs, so the documentation cannot drift from the code.

A block runs in a fresh namespace with the repository root as the working directory; its asserts
are the checks. A block announced by the line `<!-- excerpt: PATH -->` just above it shows a piece
of a source file instead: it must be that file's lines exactly, up to one common indentation.
Shell lines (```bash, or ``` alone) install or run for minutes and are not run here.
"""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```(\w*)\s*$")
EXCERPT = re.compile(r"^<!--\s*excerpt:\s*(\S+)\s*-->\s*$")


def doc_files():
    docs = os.path.join(ROOT, "docs")
    names = sorted(n for n in os.listdir(docs) if n.endswith(".md")) if os.path.isdir(docs) else []
    return ["README.md"] + [os.path.join("docs", n) for n in names]


def code_blocks(relpath):
    """(language, first line number, code, excerpt path or None) for each fenced block."""
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{relpath}:{i + 1}: the code block opened here is never closed")
        excerpt = EXCERPT.match(lines[i - 1]) if i > 0 else None
        blocks.append((opening.group(1), i + 2, "\n".join(lines[i + 1:end]),
                       excerpt.group(1) if excerpt else None))
        i = end + 1
    return blocks


def python_blocks():
    cases = []
    for relpath in doc_files():
        for lang, line, code, excerpt in code_blocks(relpath):
            if lang == "python":
                cases.append(pytest.param(relpath, line, code, excerpt, id=f"{relpath}:{line}"))
            elif excerpt:
                raise AssertionError(f"{relpath}:{line}: an excerpt must be a ```python block")
    return cases


CASES = python_blocks()


def is_excerpt_of(block, source):
    """True if the block's lines are consecutive lines of source, all with the same indentation
    removed (a blank line matches a blank line)."""
    want = block.splitlines()
    have = source.splitlines()
    first = want[0]
    for start, line in enumerate(have):
        if not line.endswith(first) or line[:len(line) - len(first)].strip():
            continue
        indent = line[:len(line) - len(first)]
        window = have[start:start + len(want)]
        if len(window) == len(want) and all(h == indent + w if w.strip() else not h.strip()
                                            for h, w in zip(window, want)):
            return True
    return False


def test_the_docs_have_code_blocks_of_both_kinds():
    """The extraction finds the README's runnable blocks and its source excerpt (`__mul__`)."""
    readme = [c.values for c in CASES if c.values[0] == "README.md"]
    assert sum(1 for _, _, _, excerpt in readme if excerpt is None) >= 3, readme
    assert any(excerpt == "tinydiff/tensor.py" and "def __mul__" in code for _, _, code, excerpt in readme)
    assert len(CASES) >= 10, [c.id for c in CASES]


@pytest.mark.parametrize("relpath,line,code,excerpt", CASES)
def test_python_block(relpath, line, code, excerpt, monkeypatch):
    if excerpt is not None:
        with open(os.path.join(ROOT, excerpt), encoding="utf-8") as f:
            source = f.read()
        assert is_excerpt_of(code, source), (
            f"{relpath}:{line}: this block is marked as an excerpt of {excerpt}, but those lines are not "
            f"in {excerpt} as they are here: copy them from the file again")
        return
    monkeypatch.chdir(ROOT)
    padded = "\n" * (line - 1) + code                  # tracebacks give the line in the .md file
    exec(compile(padded, relpath, "exec"), {"__name__": "__docs__"})


def test_an_excerpt_that_drifted_is_caught():
    """The excerpt check fails on a changed line and on lines out of order, and passes on the real ones."""
    source = "class A:\n    def f(self):\n        return 1\n\n    def g(self):\n        return 2\n"
    assert is_excerpt_of("def f(self):\n    return 1\n\ndef g(self):", source)
    assert not is_excerpt_of("def f(self):\n    return 2", source)
    assert not is_excerpt_of("def g(self):\n    return 2\ndef f(self):", source)
    assert not is_excerpt_of("def f(self):\n  return 1", source)          # a different indentation
