"""TextUNet: a noise predictor eps_theta(x_t, t, prompt), its text encoder trained with it.

    model = TextUNet(words, channels=(32, 64, 64), head_dim=32)      # words: the captions' vocabulary
    c = model.context(["a thick 7", "seven"])      # (2, 17) int64 token ids: the context is an array
    eps = model(x, model.time_input(t, T), c)      # (2, 1, 16, 16)

The prompt travels as token ids, an ordinary integer array, so training (context dropout swaps in
null_context, the ids of ""), classifier-free guidance (which stacks [c; null_context]) and every
sampler work on it as on class labels. Inside, in the order the data flows:

    prompts --Tokenizer--> ids (B, L)                     tokenizer.py; L = max_tokens + 1 (BOS first)
    ids --TextEncoder--> tokens (B, L, text_width), key_padding_mask (B, L), pooled (B, text_width)
    UNet(context_dim=text_width): pooled is added to the time embedding (where a class embedding
        enters a class-conditioned UNet); CrossAttention of the 8x8 and 4x4 feature maps and the
        middle to the tokens (Rombach et al. 2022, arXiv:2112.10752, Sec. 3.3)

The encoder is trained from scratch, jointly with the U-Net, by the diffusion loss alone.
`config` holds every constructor argument, the vocabulary included: TextUNet(**model.config) is
the same model, so a run's config.json and its weights (no pickle) are all `sample` needs.
"""
from tinydiff import backend, nn
from tinydiff.arrays import as_array
from tinydiff.tensor import Tensor
from tinydiff.text_encoder import TextEncoder
from tinydiff.tokenizer import BOS, Tokenizer
from tinydiff.unet import UNet


class TextUNet(nn.Module):
    """TextUNet(words, max_tokens=16, text_width=64, text_layers=2, text_heads=4, **unet_kwargs)
        words        the vocabulary (Tokenizer's), in order: ids 3, 4, ... (0, 1, 2 are PAD, BOS, UNK)
        max_tokens   the longest prompt, in words and punctuation marks; ids are (B, max_tokens + 1)
        text_width, text_layers, text_heads   the TextEncoder's
        unet_kwargs  UNet's (channels, head_dim, ...), but not num_classes or context_dim
    """

    def __init__(self, words, max_tokens=16, text_width=64, text_layers=2, text_heads=4, **unet_kwargs):
        super().__init__()
        for key in ("num_classes", "context_dim"):
            if key in unet_kwargs:
                raise ValueError(f"TextUNet: {key} is not a UNet argument here (the prompt is the context; "
                                 f"the token width is text_width)")
        self.tokenizer = Tokenizer(words, max_tokens)
        self.encoder = TextEncoder(len(self.tokenizer), max_tokens + 1, text_width, text_heads, text_layers)
        self.unet = UNet(context_dim=text_width, **unet_kwargs)
        unet_config = {k: v for k, v in self.unet.config.items() if k not in ("num_classes", "context_dim")}
        self.config = dict(self.tokenizer.to_dict(), text_width=text_width, text_layers=text_layers,
                           text_heads=text_heads, **unet_config)

    # --- the conditioning seam (models.py) -------------------------------------------------------
    def context(self, prompts):
        """Prompts (a list of B strings) -> int64 token ids (B, max_tokens + 1) on the model's device
        (encoded on the host, then copied); None -> None (forward then uses the null prompt)."""
        if prompts is None:
            return None
        return backend.to_device(self.tokenizer.encode(prompts), self.device)

    def null_context(self, batch):
        """The ids of the empty prompt "" (BOS, then PAD) for every sample: the null context of
        classifier-free guidance and of context dropout."""
        return self.context([""] * batch)

    def time_input(self, t, T):
        """Timestep indices t (B,) in 0..T-1 -> the indices themselves, as the UNet takes them."""
        return Tensor(t)

    @property
    def device(self):
        return self.encoder.token_emb.weight.device

    def forward(self, x, t, c=None):
        """x (B, C, H, W) noisy images, t timestep indices, c (B, L) token ids (None: the null prompt)."""
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"TextUNet: x must be a Tensor (B, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")
        b = x.shape[0]
        ids = as_array(self.null_context(b) if c is None else c, self.device)
        if ids.ndim != 2 or ids.shape[0] != b or ids.dtype.kind not in "iu":
            raise ValueError(f"TextUNet: c must be ({b}, L) integer token ids (model.context(prompts)), "
                             f"got shape {ids.shape} dtype {ids.dtype}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= len(self.tokenizer)):
            raise ValueError(f"TextUNet: token ids must lie in [0, {len(self.tokenizer)}), "
                             f"got min {int(ids.min())} max {int(ids.max())}")
        if not (ids[:, 0] == BOS).all():
            raise ValueError(f"TextUNet: every row of c must start with BOS (id {BOS}), as Tokenizer.encode writes it")
        return self.unet(x, t, text=self.encoder(ids))
