"""A small Transformer text encoder, trained from scratch with the U-Net (nothing pretrained).

    encoder = TextEncoder(vocab_size=len(tokenizer), max_len=17, width=64, heads=4, layers=2)
    tokens, key_padding_mask, pooled = encoder(ids)          # ids from Tokenizer.encode, (B, L) int64

The token ids (tinydiff/tokenizer.py) become vectors: a token embedding plus a learned position
embedding (Vaswani et al. 2017, arXiv:1706.03762, Sec. 3.4-3.5; learned positions as in GPT-2
and BERT), then `layers` pre-LayerNorm Transformer blocks (GPT-2's order, Radford et al. 2019),

    x = x + Attention(LN(x))     self-attention; PAD keys masked out (F.scaled_dot_product_attention)
    x = x + MLP(LN(x))           Linear(width, 4 width), GELU, Linear(4 width, width)

and a final LayerNorm. The attention is bidirectional (no causal mask): every word sees the whole
prompt, as in BERT. The U-Net reads two things from it (tinydiff/unet.py):
    tokens (B, L, width)      keys and values of its cross-attention (Rombach et al. 2022,
                              arXiv:2112.10752, Sec. 3.3), with key_padding_mask (B, L), True at PAD
    pooled (B, width)         the BOS token's output, added to the time embedding. BOS sits at
                              position 0 of every prompt, "" included, and attends to all its words,
                              so it is a learned summary (BERT's [CLS]); a masked mean would weigh
                              "a" and "seven" alike, and would need a second use of the mask.
The outputs at PAD positions are computed but never read: every later attention masks them.
"""
from tinydiff import nn
from tinydiff.arrays import as_array
from tinydiff.tokenizer import PAD


class TransformerBlock(nn.Module):
    """Pre-LayerNorm Transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, key_padding_mask):                     # (B, L, W), (B, L) bool
        h = self.norm1(x)
        x = x + self.attn(h, h, key_padding_mask)                # (B, L, W)
        return x + self.mlp(self.norm2(x))                       # (B, L, W)


class TextEncoder(nn.Module):
    """Token ids (B, L) -> (tokens (B, L, width), key_padding_mask (B, L) bool, pooled (B, width))."""

    def __init__(self, vocab_size, max_len, width=64, heads=4, layers=2):
        super().__init__()
        self.vocab_size, self.max_len, self.width = vocab_size, max_len, width
        self.token_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList([TransformerBlock(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)

    def forward(self, ids):
        ids = as_array(ids, self.token_emb.weight.device)
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or not 1 <= ids.shape[1] <= self.max_len:
            raise ValueError(f"TextEncoder: ids must be (B, L) integers with L <= {self.max_len}, "
                             f"got shape {ids.shape} dtype {ids.dtype}")
        key_padding_mask = ids == PAD                            # (B, L): True where there is no word
        positions = self.token_emb.weight.xp.arange(ids.shape[1])   # (L,) 0 .. L-1
        x = self.token_emb(ids) + self.pos_emb(positions)        # (B, L, W) + (L, W)
        for block in self.blocks:
            x = block(x, key_padding_mask)                       # (B, L, W)
        tokens = self.norm(x)                                    # (B, L, W)
        return tokens, key_padding_mask, tokens[:, 0]            # pooled: the BOS token's output (B, W)
