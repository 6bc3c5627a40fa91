"""Imports inside tinydiff point one way: down the layers below.

LAYERS is the architecture, bottom to top. A module may import only modules of lower layers
(not its own layer, not a higher one), so a reader following a batch from data to model to loss
to sampler never walks back up. Every import counts: absolute (`tinydiff.x`, `from tinydiff
import x`), relative (`from . import x`, `from .x import y`) and those inside functions.
`from tinydiff import Name` of something that is not a module imports the package itself
(`__init__`, the top floor). A new module must be added to LAYERS, in the layer it belongs to.

Run:  python -m pytest tests/test_import_layers.py -q
"""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tinydiff")

LAYERS = [
    ("_C", "_C_cuda"),               # the compiled kernels (csrc/, built by setup.py)
    ("backend",),                    # NumPy or CuPy, which kernels
    ("shape_ops", "kernels"),        # shape/index ops of the autograd; NumPy references of csrc/
    ("tensor", "philox"),            # Tensor, backward, no_grad, elementwise/reduce/matmul; the noise generator
    ("arrays",),                     # the one way to put a value on a device
    ("functional", "module", "gradcheck"),   # ops of the layers (F), Module, gradient checks
    ("nn", "tokenizer"),             # the layers as Modules; prompts -> token ids
    ("context_unet", "unet", "text_encoder"),   # the models; the text encoder
    ("text_unet",),                  # the UNet conditioned on prompts (unet + text encoder)
    ("models",),                     # the models by name
    ("optim", "checkpoint", "torch_import"),  # optimizers, weights on disk, PyTorch files
    ("data",),                       # the digits data set
    ("captions",),                   # the digits' captions, from their ink and slant
    ("diffusion",),                  # schedules, q_sample, the loss
    ("classifier",),                 # the noisy classifier of classifier guidance
    ("samplers",),                   # DDPM and DDIM sampling, guidance
    ("config", "runs", "pictures", "interrupt"),   # run settings, run folders, image writers, Ctrl-C
    ("train", "evaluate", "diffusers_bridge", "info"),   # the training loop; sample quality; diffusers; the install
    ("cli",),                        # the `tinydiff` command
    ("__main__", "__init__"),        # `python -m tinydiff`; the package's public names
]
COMPILED = {"_C", "_C_cuda"}         # no .py source: they may be unbuilt


def layer_of(layers):
    return {module: i for i, layer in enumerate(layers) for module in layer}


def imported_modules(source, submodules):
    """The tinydiff modules a source imports, as (name, line). `submodules`: the package's modules,
    to tell `from tinydiff import backend` (a module) from `from tinydiff import Tensor` (__init__)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "tinydiff":
                    found.append((parts[1] if len(parts) > 1 else "__init__", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                raise ValueError(f"line {node.lineno}: an import above the package (level {node.level})")
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 0:
                if not parts or parts[0] != "tinydiff":
                    continue                                   # numpy, os, ...
                parts = parts[1:]
            if parts:                                          # from tinydiff.x import y / from .x import y
                found.append((parts[0], node.lineno))
            else:                                              # from tinydiff import x / from . import x
                found.extend((a.name if a.name in submodules else "__init__", node.lineno) for a in node.names)
    return found


def violations(module, source, layers, submodules):
    """Messages for each import of `module` that does not point to a lower layer."""
    where = layer_of(layers)
    if module not in where:
        return [f"tinydiff/{module}.py is in no layer: add it to LAYERS in tests/test_import_layers.py, "
                f"in the layer above everything it imports"]
    wrong = []
    for name, line in imported_modules(source, submodules):
        if name not in where:
            wrong.append(f"tinydiff/{module}.py:{line} imports tinydiff.{name}, which is in no layer: "
                         f"add it to LAYERS in tests/test_import_layers.py")
        elif where[name] >= where[module]:
            how = "its own layer" if where[name] == where[module] else "a higher layer"
            wrong.append(f"tinydiff/{module}.py:{line} imports {name}, of {how} "
                         f"({layers[where[name]]} is layer {where[name]}, {module} is layer {where[module]}): "
                         f"imports must point down")
    return wrong


def package_sources():
    return {name[:-3]: open(os.path.join(PACKAGE, name)).read()
            for name in sorted(os.listdir(PACKAGE)) if name.endswith(".py")}


def test_every_import_points_down_the_layers():
    sources = package_sources()
    submodules = set(sources) | COMPILED
    wrong = [msg for module, source in sources.items() for msg in violations(module, source, LAYERS, submodules)]
    assert not wrong, "\n".join(wrong)


def test_the_layers_name_only_modules_that_exist():
    listed = {m for layer in LAYERS for m in layer} - COMPILED
    missing = sorted(listed - set(package_sources()))
    assert not missing, f"LAYERS names modules that tinydiff/ does not have: {missing}"
    assert len(listed) == sum(len(layer) for layer in LAYERS) - len(COMPILED), "a module is in two layers"


# ---------------------------------------------------------------------------------------------
# The check itself, on synthetic sources: it must fail where it should

SUBMODULES = {"backend", "tensor", "samplers", "diffusion", "cli", "__init__"}
TOY = [("backend",), ("tensor",), ("diffusion",), ("samplers",), ("cli", "__init__")]


@pytest.mark.parametrize("source", [
    "from tinydiff.samplers import ddim_sample\n",
    "import tinydiff.samplers\n",
    "from tinydiff import samplers\n",
    "from . import samplers\n",
    "from .samplers import ddim_sample\n",
    "import numpy as np\n\ndef f():\n    from tinydiff.samplers import ddim_sample   # inside a function\n",
    "from tinydiff import Tensor\n",            # the package itself: the top floor
    "import tinydiff\n",
    "from tinydiff import diffusion\n",         # the same layer
])
def test_an_upward_import_is_refused(source):
    wrong = violations("diffusion", source, TOY, SUBMODULES)
    assert len(wrong) == 1, wrong
    assert "imports must point down" in wrong[0]


@pytest.mark.parametrize("source", [
    "from tinydiff.tensor import Tensor\nfrom tinydiff import backend\n",
    "from . import tensor\nfrom .backend import get_array_module\n",
    "import numpy as np\nimport os.path\nfrom os import path\n",
    "def f():\n    import tinydiff.backend\n",
])
def test_a_downward_import_passes(source):
    assert violations("diffusion", source, TOY, SUBMODULES) == []


def test_a_module_in_no_layer_is_refused_with_what_to_do():
    wrong = violations("run_folder", "from tinydiff.tensor import Tensor\n", TOY, SUBMODULES)
    assert len(wrong) == 1 and "in no layer: add it to LAYERS" in wrong[0]
    wrong = violations("samplers", "from tinydiff.run_folder import load_run\n", TOY, SUBMODULES)
    assert len(wrong) == 1 and "tinydiff.run_folder, which is in no layer: add it to LAYERS" in wrong[0]

