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
