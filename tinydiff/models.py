"""The noise predictors eps_theta(x_t, t, c), one import away. Read them in this order:

context_unet.py  the course's ContextUnet: t is (timestep + 1) / T, c a one-hot context vector,
                 zeros when unconditional.
unet.py          a modern UNet (GroupNorm, SiLU, attention): t is the timestep index, c an integer
                 class, `num_classes` when unconditional.

Both are called as model(x, t, c), and both own their conditioning through the same three methods,
which are all that training, the samplers, the CLI and the demos use (a new kind of context, such
as text, is a new model with these methods, and nothing outside it changes):
    model.context(labels)     what the user asked for (class labels; None: unconditional) -> c
    model.null_context(B)     the "no context" c of classifier-free guidance and context dropout
    model.time_input(t, T)    timestep indices t (B,) -> the model's time input
"""
from tinydiff.context_unet import ContextUnet, EmbedFC, ResidualConvBlock, UnetDown, UnetUp  # noqa: F401
from tinydiff.unet import UNet, timestep_embedding  # noqa: F401
