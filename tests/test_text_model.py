"""The text-conditioned model of issue 12: masked attention, the text encoder, cross-attention in
the UNet, TextUNet and its conditioning seam, the checkpoint round trip and the GPU path.

Run:  python -m pytest tests/test_text_model.py -q
"""
import numpy as np
import pytest

from tinydiff import F, Tensor


def softmax_np(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention_np(q, k, v, key_padding_mask=None):
    """softmax(q k^T / sqrt(d)) v in NumPy, padded keys dropped from the softmax (Vaswani et al. eq. 1)."""
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])               # (B, ..., Lq, Lk)
    if key_padding_mask is not None:
        keep = ~key_padding_mask.reshape((q.shape[0],) + (1,) * (q.ndim - 2) + (k.shape[-2],))
        w = np.exp(scores - scores.max(axis=-1, keepdims=True)) * keep
        return (w / w.sum(axis=-1, keepdims=True)) @ v
    return softmax_np(scores) @ v


# ---------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention with a key padding mask


def test_attention_matches_numpy_and_ignores_padded_keys():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 3, 4, 8)), rng.standard_normal((2, 3, 6, 8)), rng.standard_normal((2, 3, 6, 5))
    mask = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 0, 0, 0, 1]], bool)
    kt, vt = Tensor(k.copy(), requires_grad=True), Tensor(v.copy(), requires_grad=True)
    out = F.scaled_dot_product_attention(Tensor(q), kt, vt, key_padding_mask=mask)
    np.testing.assert_allclose(out.numpy(), attention_np(q, k, v, mask), rtol=1e-12, atol=1e-12)
    out.backward(rng.standard_normal(out.shape))
    padded = np.broadcast_to(mask[:, None, :, None], k.shape)
    assert not kt.grad[padded].any() and not vt.grad[np.broadcast_to(mask[:, None, :, None], v.shape)].any()
    assert np.abs(kt.grad[~padded]).min() > 0                     # the kept keys do get a gradient
    k2, v2 = k.copy(), v.copy()                                   # whatever sits at a padded key: same output
    k2[padded], v2[np.broadcast_to(mask[:, None, :, None], v.shape)] = 1e3, -1e3
    again = F.scaled_dot_product_attention(Tensor(q), Tensor(k2), Tensor(v2), key_padding_mask=mask)
    np.testing.assert_array_equal(again.numpy(), out.numpy())


def test_attention_refuses_a_row_with_every_key_masked():
    q = Tensor(np.zeros((2, 3, 4)))
    mask = np.array([[False, True], [True, True]])
    with pytest.raises(ValueError, match="masks every key of sample 1"):
        F.scaled_dot_product_attention(q, Tensor(np.zeros((2, 2, 4))), Tensor(np.zeros((2, 2, 4))), mask)


@pytest.mark.parametrize("mask, match", [
    (np.zeros((2, 3), bool), r"must be \(2, 2\) bool"),
    (np.zeros((2, 2), np.int64), r"must be \(2, 2\) bool"),
])
def test_attention_refuses_a_misshapen_mask(mask, match):
    q, k = Tensor(np.zeros((2, 3, 4))), Tensor(np.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match=match):
        F.scaled_dot_product_attention(q, k, k, mask)


def test_attention_refuses_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match="must be"):
        F.scaled_dot_product_attention(Tensor(np.zeros((2, 3, 4))), Tensor(np.zeros((2, 2, 5))),
                                       Tensor(np.zeros((2, 2, 4))))


# ---------------------------------------------------------------------------------------------
# The text encoder


def layer_norm_np(x, eps=1e-5):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def gelu_np(x):
    from math import erf
    return x * 0.5 * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def linear_np(layer, x):
    return x @ layer.weight.numpy().T + layer.bias.numpy()


def mha_np(attn, query, context, mask):
    """nn.MultiheadAttention in NumPy: split the heads, attention_np, join, project."""
    def split(y):                                              # (B, L, C) -> (B, heads, L, d)
        b, n, c = y.shape
        return y.reshape(b, n, attn.num_heads, c // attn.num_heads).transpose(0, 2, 1, 3)
    q, k, v = (split(linear_np(layer, src)) for layer, src in ((attn.q, query), (attn.k, context), (attn.v, context)))
    y = attention_np(q, k, v, mask).transpose(0, 2, 1, 3)
    return linear_np(attn.proj, y.reshape(y.shape[0], y.shape[1], -1))


def encoder_np(enc, ids):
    """TextEncoder.forward transcribed in NumPy (its LayerNorms start as weight 1, bias 0)."""
    mask = ids == 0
    x = enc.token_emb.weight.numpy()[ids] + enc.pos_emb.weight.numpy()[np.arange(ids.shape[1])]
    for blk in enc.blocks:
        h = layer_norm_np(x)
        x = x + mha_np(blk.attn, h, h, mask)
        x = x + linear_np(blk.mlp[2], gelu_np(linear_np(blk.mlp[0], layer_norm_np(x))))
    tokens = layer_norm_np(x)
    return tokens, mask, tokens[:, 0]


def small_encoder():
    import tinydiff
    from tinydiff.text_encoder import TextEncoder
    tinydiff.manual_seed(0)
    return TextEncoder(vocab_size=12, max_len=9, width=16, heads=4, layers=2).double()


def test_text_encoder_shapes_and_numpy_transcription():
    enc = small_encoder()
    ids = np.array([[1, 5, 7, 3, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [1, 2, 11, 4, 9, 10, 6]])
    tokens, mask, pooled = enc(ids)
    assert tokens.shape == (3, 7, 16) and pooled.shape == (3, 16) and mask.dtype == bool
    np.testing.assert_array_equal(mask, ids == 0)
    ref_tokens, _, ref_pooled = encoder_np(enc, ids)
    words = ~mask
    np.testing.assert_allclose(tokens.numpy()[words], ref_tokens[words], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(pooled.numpy(), ref_pooled, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(pooled.numpy(), tokens.numpy()[:, 0])     # pooled: the BOS token


def test_text_encoder_ignores_padding():
    """More PAD columns, or other embeddings at the padded positions, change no word's output."""
    enc = small_encoder()
    ids = np.array([[1, 5, 7, 0, 0], [1, 3, 0, 0, 0]])
    tokens, _, pooled = enc(ids)
    longer, _, pooled_longer = enc(np.concatenate([ids, np.zeros((2, 4), np.int64)], axis=1))
    np.testing.assert_allclose(pooled_longer.numpy(), pooled.numpy(), rtol=1e-12, atol=1e-12)   # sums of other lengths
    words = ids[:, :3] != 0
    np.testing.assert_allclose(longer.numpy()[:, :3][words], tokens.numpy()[:, :3][words], rtol=1e-12, atol=1e-12)
    enc.token_emb.weight.data[0] = 100.0                       # the PAD row
    enc.pos_emb.weight.data[3:] = -50.0                        # positions only padding reaches here
    _, _, pooled_changed = enc(ids)
    np.testing.assert_array_equal(pooled_changed.numpy(), pooled.numpy())


def test_text_encoder_refuses_bad_ids():
    enc = small_encoder()
    with pytest.raises(ValueError, match=r"ids must be \(B, L\) integers with L <= 9"):
        enc(np.ones((2, 10), np.int64))
    with pytest.raises(ValueError, match="ids must be"):
        enc(np.ones((2, 3)))
