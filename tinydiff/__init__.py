"""tinydiff: a from-scratch diffusion engine. Read in this order:

backend (NumPy or CuPy, compiled kernels) -> tensor (autograd; its shape ops in shape_ops)
-> arrays (a value onto a device) -> functional (layers as ops) -> kernels (the NumPy references
of csrc/) -> module, nn (modules), tokenizer -> context_unet, unet, text_encoder -> text_unet
(models: each owns its conditioning)
-> optim, checkpoint -> data -> diffusion (schedules, loss) -> samplers
-> config, runs, pictures, interrupt -> train -> cli.
"""
from tinydiff import functional
from tinydiff.backend import cuda_available, get_kernels, manual_seed, set_kernels
from tinydiff.gradcheck import gradcheck
from tinydiff.tensor import Tensor, cat, is_grad_enabled, matmul, no_grad, stack, where
from tinydiff import optim
from tinydiff.checkpoint import (CheckpointError, load_checkpoint, load_weights, save_checkpoint,
                                 save_weights)
from tinydiff.torch_import import load_torch_checkpoint
from tinydiff.diffusers_bridge import load_diffusers_unet
from tinydiff import models, diffusion, samplers   # tinydiff.models.UNet after `import tinydiff`, as torch.nn

F = functional

__all__ = ["Tensor", "no_grad", "is_grad_enabled", "cat", "stack", "where", "matmul", "gradcheck",
           "functional", "F", "manual_seed", "set_kernels", "get_kernels", "cuda_available"]
__all__ += ["optim", "save_weights", "load_weights", "save_checkpoint", "load_checkpoint",
            "CheckpointError", "load_torch_checkpoint", "load_diffusers_unet", "models", "diffusion", "samplers"]
