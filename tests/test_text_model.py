"""The text-conditioned model of issue 12: masked attention, the text encoder, cross-attention in
the UNet, TextUNet and its conditioning seam, the checkpoint round trip and the GPU path.

Run:  python -m pytest tests/test_text_model.py -q
"""
import json
from math import erf

import numpy as np
import pytest

import tinydiff
from tinydiff import F, Tensor, nn, runs, samplers
from tinydiff.checkpoint import load_weights, read_safetensors, save_weights
from tinydiff.diffusion import NoiseSchedule, training_loss
from tinydiff.models import TextUNet
from tinydiff.philox import Philox
from tinydiff.text_encoder import TextEncoder
from tinydiff.unet import CrossAttention, UNet


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


@pytest.mark.parametrize("kdim", [None, 6])
def test_multihead_attention_gradcheck_and_matches_torch(kdim):
    """nn.MultiheadAttention: float64 gradient check, and torch.nn.MultiheadAttention given the same
    weights (its key_padding_mask, True = ignore, is ours); self-attention and cross-attention."""
    tinydiff.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, kdim=kdim).double()
    rng = np.random.default_rng(4)
    query = Tensor(rng.standard_normal((2, 3, 8)), requires_grad=True)
    context = query if kdim is None else Tensor(rng.standard_normal((2, 4, 6)), requires_grad=True)
    mask = np.zeros((2, context.shape[1]), bool)
    mask[0, -1] = mask[1, 1:] = True
    inputs = [query] + ([] if kdim is None else [context])
    assert tinydiff.gradcheck(lambda q, *rest: attn(q, q if kdim is None else rest[0], mask),
                              inputs + attn.parameters())
    torch = pytest.importorskip("torch", reason="PyTorch is the oracle: pip install torch==2.13.0")
    ref = torch.nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=True, dtype=torch.float64)
    w = {name: torch.from_numpy(layer.weight.numpy()) for name, layer in
         (("q", attn.q), ("k", attn.k), ("v", attn.v))}
    with torch.no_grad():
        if kdim is None:
            ref.in_proj_weight.copy_(torch.cat([w["q"], w["k"], w["v"]]))
        else:
            ref.q_proj_weight.copy_(w["q"]), ref.k_proj_weight.copy_(w["k"]), ref.v_proj_weight.copy_(w["v"])
        ref.in_proj_bias.copy_(torch.from_numpy(np.concatenate([attn.q.bias.numpy(), attn.k.bias.numpy(),
                                                                attn.v.bias.numpy()])))
        ref.out_proj.weight.copy_(torch.from_numpy(attn.proj.weight.numpy()))
        ref.out_proj.bias.copy_(torch.from_numpy(attn.proj.bias.numpy()))
    tq, tc = torch.from_numpy(query.numpy()), torch.from_numpy(context.numpy())
    expected, _ = ref(tq, tc, tc, key_padding_mask=torch.from_numpy(mask), need_weights=False)
    np.testing.assert_allclose(attn(query, context, mask).numpy(), expected.detach().numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The text encoder


def layer_norm_np(x, eps=1e-5):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def gelu_np(x):
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


# ---------------------------------------------------------------------------------------------
# Cross-attention in the UNet


def group_norm_np(x, groups, eps=1e-5):
    b, c = x.shape[:2]
    g = x.reshape(b, groups, -1)
    return ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)).reshape(x.shape)


def cross_attention_np(block, x, tokens, mask):
    """CrossAttention.forward in NumPy: x + MHA(queries = GN(x) positions, keys/values = tokens)."""
    b, c, h, w = x.shape
    queries = group_norm_np(x, block.norm.num_groups).reshape(b, c, h * w).transpose(0, 2, 1)
    y = mha_np(block.attn, queries, tokens, mask)                  # (B, HW, C)
    return x + y.transpose(0, 2, 1).reshape(b, c, h, w)


def small_cross_attention():
    tinydiff.manual_seed(1)
    return CrossAttention(8, context_dim=6, head_dim=4, groups=2).double()


def test_cross_attention_matches_numpy_and_padding_changes_nothing():
    block = small_cross_attention()
    rng = np.random.default_rng(2)
    x, tokens = rng.standard_normal((2, 8, 3, 5)), rng.standard_normal((2, 4, 6))
    mask = np.array([[False, False, True, True], [False, True, True, True]])
    text = (Tensor(tokens), mask, None)
    out = block(Tensor(x), text)
    assert out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), cross_attention_np(block, x, tokens, mask), rtol=1e-10, atol=1e-10)
    changed = tokens.copy()
    changed[mask] = rng.standard_normal((mask.sum(), 6)) * 100   # other vectors at the PAD positions
    np.testing.assert_array_equal(block(Tensor(x), (Tensor(changed), mask, None)).numpy(), out.numpy())
    more = np.concatenate([tokens, rng.standard_normal((2, 3, 6))], axis=1)   # three more PAD tokens
    more_mask = np.concatenate([mask, np.ones((2, 3), bool)], axis=1)
    np.testing.assert_allclose(block(Tensor(x), (Tensor(more), more_mask, None)).numpy(), out.numpy(),
                               rtol=1e-12, atol=1e-12)


def test_cross_attention_gradcheck_with_padding():
    block = small_cross_attention()
    rng = np.random.default_rng(3)
    x, tokens = (Tensor(rng.standard_normal(s), requires_grad=True) for s in ((1, 8, 2, 3), (1, 3, 6)))
    mask = np.array([[False, False, True]])
    assert tinydiff.gradcheck(lambda x, tokens, *ps: block(x, (tokens, mask, None)),
                              [x, tokens] + block.parameters())
    assert not tokens.grad[0, 2].any()                          # the PAD token gets no gradient


def test_unet_with_context_dim_refuses_missing_or_misshapen_text():
    unet = UNet(channels=(8, 16), height=8, head_dim=8, context_dim=6)
    x = Tensor(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"text must be the text encoder's \(tokens \(2, L, 6\)"):
        unet(x, [1, 2])
    bad = (Tensor(np.zeros((2, 3, 5), np.float32)), np.zeros((2, 3), bool), Tensor(np.zeros((2, 6), np.float32)))
    with pytest.raises(ValueError, match="text must be"):
        unet(x, [1, 2], text=bad)
    with pytest.raises(ValueError, match="no cross-attention"):
        UNet(channels=(8, 16), height=8)(x, [1, 2], text=bad)
    with pytest.raises(ValueError, match="cross_attention_levels needs one entry per level"):
        UNet(channels=(8, 16), height=8, context_dim=6, cross_attention_levels=[True])


# ---------------------------------------------------------------------------------------------
# TextUNet: the seam, forward/backward, the checkpoint round trip, the GPU path

WORDS = ["a", "thick", "thin", "seven", "7", "3", "digit", "the", ",", "slanted", "right"]


def tiny_text_unet(seed=0):
    tinydiff.manual_seed(seed)
    return TextUNet(WORDS, max_tokens=6, text_width=16, text_layers=1, text_heads=2,
                    channels=(8, 16, 16), height=8, head_dim=8)


def test_text_unet_forward_backward_shapes():
    m = tiny_text_unet()
    c = m.context(["a thick 7", "the digit 3 , slanted right", ""])
    assert c.shape == (3, 7) and c.dtype == np.int64
    x = Tensor(np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32), requires_grad=True)
    out = m(x, m.time_input(np.array([0, 10, 99]), 100), c)
    assert out.shape == (3, 1, 8, 8) and out.dtype == np.float32
    (out * out).sum().backward()
    assert x.grad.shape == x.shape and np.isfinite(x.grad).all()
    named = dict(m.named_parameters())
    no_grad = sorted(k for k, p in named.items() if p.grad is None or not np.abs(p.grad).sum())
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    g = named["encoder.token_emb.weight"].grad
    assert not g[0].any()                                      # PAD: masked everywhere, so no gradient
    assert not g[[m.tokenizer.ids["thin"], m.tokenizer.ids["seven"]]].any()   # words not in these prompts
    assert g[m.tokenizer.ids["thick"]].any() and g[1].any()    # a word used, and BOS
    assert any(k.startswith("unet.downs.1.cross_attentions") for k in named)
    assert any(k.startswith("unet.mid_cross") for k in named)
    assert not any(k.startswith("unet.downs.0.cross_attentions") for k in named)   # not at full size


def test_context_and_null_context():
    m = tiny_text_unet()
    np.testing.assert_array_equal(m.context(["seven", "a thin 7"]), m.tokenizer.encode(["seven", "a thin 7"]))
    null = m.null_context(4)
    np.testing.assert_array_equal(null, m.tokenizer.encode([""] * 4))
    assert null[:, 0].tolist() == [1] * 4 and not null[:, 1:].any()
    assert m.context(None) is None
    x, t = Tensor(np.ones((4, 1, 8, 8), np.float32)), np.array([3, 3, 50, 50])
    np.testing.assert_array_equal(m(x, t, None).numpy(), m(x, t, null).numpy())   # None: the null prompt
    assert m.time_input(t, 100).numpy().tolist() == t.tolist()


def test_text_unet_output_ignores_the_pad_embedding():
    m = tiny_text_unet()
    x, t = Tensor(np.ones((2, 1, 8, 8), np.float32)), np.array([5, 60])
    c = m.context(["a thick 7", ""])
    before = m(x, t, c).numpy()
    m.encoder.token_emb.weight.data[0] = 1e3                    # the PAD row
    np.testing.assert_array_equal(m(x, t, c).numpy(), before)


@pytest.mark.parametrize("c, match", [
    (np.ones((2, 7)), r"c must be \(2, L\) integer token ids"),
    (np.ones((3, 7), np.int64), r"c must be \(2, L\)"),
    (np.full((2, 7), 99), r"token ids must lie in \[0, 14\)"),
    (np.zeros((2, 7), np.int64), "start with BOS"),
])
def test_text_unet_refuses_bad_context(c, match):
    m = tiny_text_unet()
    with pytest.raises(ValueError, match=match):
        m(Tensor(np.zeros((2, 1, 8, 8), np.float32)), np.array([1, 2]), c)


def test_text_unet_refuses_class_arguments():
    with pytest.raises(ValueError, match="num_classes is not a UNet argument here"):
        TextUNet(WORDS, num_classes=10)


def test_the_seam_with_the_samplers_guided_ddim():
    m = tiny_text_unet().eval()
    s = NoiseSchedule("linear", 50)
    c = m.context(["a thick 7", "seven", "the digit 3"])
    x = samplers.ddim_sample(m, s, (3, 1, 8, 8), c, steps=4, guidance_scale=3.0, seed=0)
    assert x.shape == (3, 1, 8, 8) and np.isfinite(x).all()
    again = samplers.ddim_sample(m, s, (3, 1, 8, 8), c, steps=4, guidance_scale=3.0, seed=0)
    np.testing.assert_array_equal(again, x)
    unguided = samplers.ddim_sample(m, s, (3, 1, 8, 8), c, steps=4, seed=0)
    assert not np.array_equal(unguided, x)                      # guidance used the null prompt


def test_training_loss_with_context_dropout_runs_on_token_ids():
    m = tiny_text_unet()
    x0 = np.random.default_rng(0).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    loss = training_loss(m, NoiseSchedule("linear", 50), x0, m.context(["7", "a thick 7", "3", ""]),
                         generator=Philox(0), context_drop=0.5)
    loss.backward()
    assert np.isfinite(loss.item()) and m.encoder.token_emb.weight.grad is not None


def test_state_dict_and_config_round_trip(tmp_path):
    m = tiny_text_unet(seed=0)
    path = str(tmp_path / "model.safetensors")
    save_weights(m, path, metadata={"tinydiff.config": json.dumps(m.config)})
    _, metadata = read_safetensors(path)
    config = json.loads(metadata["tinydiff.config"])
    assert config["words"] == WORDS and config["max_tokens"] == 6
    tinydiff.manual_seed(123)                                   # other initial weights: load must replace them
    again = load_weights(TextUNet(**config), path)
    assert again.config == m.config
    x, t = Tensor(np.ones((2, 1, 8, 8), np.float32)), np.array([4, 40])
    c = m.context(["a thick 7", "the digit 3 , slanted right"])
    np.testing.assert_array_equal(again(x, t, again.context(["a thick 7", "the digit 3 , slanted right"])).numpy(),
                                  m(x, t, c).numpy())


def test_run_config_kind_text_unet():
    cfg = dict(model="text_unet", n_feat=8, vocabulary=WORDS, in_channels=1, num_classes=10, height=16)
    model = runs.model_from_config(cfg)
    assert isinstance(model, TextUNet) and model.tokenizer.words == WORDS
    assert model.config["channels"] == [8, 16, 32] and model.config["head_dim"] == 8


def test_gpu_path_beside_the_cpu_path():
    ok, why = tinydiff.backend.cuda_available(reason=True)
    if not ok:
        pytest.skip(f"needs a CUDA GPU and CuPy: {why}")
    cp = tinydiff.backend.cupy_module()
    cpu = tiny_text_unet(seed=0)
    gpu = tiny_text_unet(seed=0).to("cuda")
    prompts = ["a thick 7", "the digit 3 , slanted right", ""]
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    t = np.array([1, 20, 90])
    c_gpu = gpu.context(prompts)
    assert tinydiff.backend.device_of(c_gpu) == "cuda" and tinydiff.backend.device_of(gpu.null_context(3)) == "cuda"
    xc, xg = Tensor(x.copy(), requires_grad=True), Tensor(cp.asarray(x), requires_grad=True)
    out_cpu = cpu(xc, cpu.time_input(t, 100), cpu.context(prompts))
    out_gpu = gpu(xg, gpu.time_input(cp.asarray(t), 100), c_gpu)
    diff = np.abs(out_gpu.numpy() - out_cpu.numpy()).max()
    print(f"largest |gpu - cpu| of the output: {diff:.3g}")
    np.testing.assert_allclose(out_gpu.numpy(), out_cpu.numpy(), atol=1e-4, rtol=1e-4)
    (out_cpu * out_cpu).sum().backward()
    (out_gpu * out_gpu).sum().backward()
    np.testing.assert_allclose(cp.asnumpy(xg.grad), xc.grad, atol=1e-3, rtol=1e-3)
    g_cpu = dict(cpu.named_parameters())["encoder.token_emb.weight"].grad
    g_gpu = cp.asnumpy(dict(gpu.named_parameters())["encoder.token_emb.weight"].grad)
    np.testing.assert_allclose(g_gpu, g_cpu, atol=1e-3, rtol=1e-3)


def test_unet_without_context_dim_keeps_its_layout():
    """context_dim=None: no cross-attention modules, no text projection, the config of before (the
    diffusers bridge's layout; tests/test_diffusers_bridge.py moves its weights both ways)."""
    unet = UNet(channels=(8, 16, 16), height=8, num_classes=3, head_dim=8)
    assert not [k for k in unet.state_dict() if "cross" in k or "text_proj" in k]
    assert "context_dim" not in unet.config and "cross_attention_levels" not in unet.config
    assert UNet(**unet.config).config == unet.config
