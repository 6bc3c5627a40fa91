"""Every ```python block of README.md and docs/*.md runs, so the documentation cannot drift from the code.

A block runs in a fresh namespace with the repository root as the working directory; its asserts
are the checks. A block announced by the line `<!-- excerpt: PATH -->` just above it shows a piece
of a source file instead: it must be that file's lines exactly, up to one common indentation.
A block announced by `<!-- needs: torch -->` is skipped, saying so, where a module it names is missing.
Shell lines (```bash, or ``` alone) install or run for minutes and are not run here.
The prose is held to the code too: every repository path and every `module.function` of tinydiff
that the docs write in backticks must exist.
"""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```(\w*)\s*$")
EXCERPT = re.compile(r"^<!--\s*excerpt:\s*(\S+)\s*-->\s*$")
NEEDS = re.compile(r"^<!--\s*needs:\s*([\w. ]+?)\s*-->\s*$")   # optional modules: skipped without them


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
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        above = f.read().splitlines()[line - 3] if line >= 3 else ""    # the line above the fence
    needs = NEEDS.match(above)
    for module in needs.group(1).split() if needs else []:
        pytest.importorskip(module, reason=f"{relpath}:{line} needs {module}")
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


PATH_IN_CODE = re.compile(r"`((?:tinydiff|demos|benchmarks|tests|csrc|scripts|docs)/[\w.*/-]*)`")
NAME_IN_CODE = re.compile(r"`(?:tinydiff\.)?([a-z_]+)\.([A-Za-z_]\w*)")
FILE_SUFFIXES = {"py", "pkl", "md", "json", "safetensors", "png", "gif", "npz", "npy", "pth", "cu", "cpp", "h", "sh"}


def doc_text(relpath):
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("relpath", doc_files())
def test_the_files_the_docs_name_exist(relpath):
    """Every repository path written in backticks (`tinydiff/samplers.py`, `csrc/*.cu`) exists."""
    import glob
    missing = sorted({p for p in PATH_IN_CODE.findall(doc_text(relpath))
                      if not glob.glob(os.path.join(ROOT, p.rstrip("/")))})
    assert not missing, f"{relpath} names files that are not in the repository: {missing}"


@pytest.mark.parametrize("relpath", doc_files())
def test_the_functions_the_docs_name_exist(relpath):
    """Every `module.name` whose module is a tinydiff module (`samplers.ddim_sample`,
    `diffusion.model_time`, `tinydiff.manual_seed`) names an attribute that module has."""
    import importlib
    modules = {n[:-3] for n in os.listdir(os.path.join(ROOT, "tinydiff")) if n.endswith(".py")}
    modules.discard("__init__")
    missing = []
    for module, name in set(NAME_IN_CODE.findall(doc_text(relpath))):
        if module == "tinydiff" and not name.startswith("_"):        # `tinydiff.manual_seed`; not the built modules
            found = hasattr(importlib.import_module("tinydiff"), name)
        elif module in modules and name not in FILE_SUFFIXES:
            found = hasattr(importlib.import_module(f"tinydiff.{module}"), name)
        else:
            continue
        if not found:
            missing.append(f"{module}.{name}")
    assert not missing, f"{relpath} names functions that tinydiff does not have: {sorted(missing)}"
