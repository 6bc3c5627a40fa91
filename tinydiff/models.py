"""The noise predictors eps_theta(x_t, t, c), one import away. Read them in this order:

context_unet.py  the course's ContextUnet: t is timestep/T (time_input = "fraction"), c a context
                 vector, zeros when unconditional.
unet.py          a modern UNet (GroupNorm, SiLU, attention): t is the timestep index
                 (time_input = "index"), c an integer class, `num_classes` when unconditional.

Both are called as model(x, t, c) and give model.null_context(batch) for classifier-free guidance.
"""
from tinydiff.context_unet import ContextUnet, EmbedFC, ResidualConvBlock, UnetDown, UnetUp  # noqa: F401
from tinydiff.unet import UNet, timestep_embedding  # noqa: F401
