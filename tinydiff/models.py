"""The noise predictors eps_theta(x_t, t, c), one import away. Read them in this order:

context_unet.py  the course's ContextUnet: t is (timestep + 1) / T, c a one-hot context vector,
                 zeros when unconditional.
unet.py          a modern UNet (GroupNorm, SiLU, attention): t is the timestep index, c an integer
                 class, `num_classes` when unconditional.
text_unet.py     the UNet conditioned on a prompt: c the token ids of tokenizer.py, read by the
                 text encoder of text_encoder.py and attended to by cross-attention; "" unconditional.

All are called as model(x, t, c), and all own their conditioning through the same three methods,
which are all that training, the samplers, the CLI and the demos use (text is the second kind of
context: TextUNet has these methods, and nothing outside it changes):
    model.context(labels)     what the user asked for (class labels, or prompts; None: unconditional) -> c
    model.null_context(B)     the "no context" c of classifier-free guidance and context dropout
    model.time_input(t, T)    timestep indices t (B,) -> the model's time input
"""
from tinydiff.context_unet import ContextUnet, EmbedFC, ResidualConvBlock, UnetDown, UnetUp  # noqa: F401
from tinydiff.text_unet import TextUNet  # noqa: F401
from tinydiff.unet import UNet, timestep_embedding  # noqa: F401
