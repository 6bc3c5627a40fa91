"""Neural-network ops on Tensors, named and ordered as in torch.nn.functional (import as F).

Light ops are built from the Tensor primitives in tensor.py, or written in its four steps.
Heavy ops (convolutions, normalisations, pooling) are a pair of functions on raw arrays,
`<op>_forward(...) -> (out, cache)` and `<op>_backward(dout, cache, needs) -> grads`, joined
to the graph by `_from_pair`. Layouts are PyTorch's: NCHW images, conv weight
(out, in, kh, kw), transposed-conv weight (in, out, kh, kw), linear weight (out, in).
"""
import math

from tinydiff import backend, kernels, philox
from tinydiff.tensor import Tensor, cat, is_grad_enabled, stack, where  # noqa: F401  (re-exported for F.cat etc.)


def _from_pair(name, inputs, out, cache, backward):
    """Make `out` a Tensor of the graph whose gradient `backward(dout, cache, needs)` gives."""
    parents = tuple(t for t in inputs if t is not None)
    for t in parents[1:]:
        if t.device != parents[0].device:
            raise ValueError(f"{name}: tensors on different devices: {parents[0].device} and {t.device}")
    result = parents[0]._result(out, parents, name)
    needs = tuple(t is not None and t.requires_grad for t in inputs)

    def _backward():
        for t, grad in zip(inputs, backward(result.grad, cache, needs)):
            if t is not None and grad is not None:
                t._accumulate(grad)
    result._backward = _backward
    return result


def _check_devices(name, **tensors):
    """Tensors on one device: a mix-up fails here, naming the arguments, not inside a kernel."""
    devices = {arg: t.device for arg, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{name}: tensors on different devices: {devices}")


def _check_float(name, **tensors):
    """Float tensors on one device."""
    for arg, t in tensors.items():
        if t is not None and t.dtype.kind != "f":
            raise TypeError(f"{name}: {arg} must be a float tensor, got dtype {t.dtype}")
    _check_devices(name, **tensors)


def _check_channels(name, x, **params):
    """weight and bias of a norm layer hold one value per channel: shape (C,)."""
    for arg, t in params.items():
        if t is not None and t.shape != (x.shape[1],):
            raise ValueError(f"{name}: {arg} shape {t.shape} should be ({x.shape[1]},) "
                             f"for input shape {x.shape}")


# ---------------------------------------------------------------------------------------------
# Activations


def relu(x):
    return x.relu()


def sigmoid(x):
    return x.sigmoid()


def tanh(x):
    return x.tanh()


def silu(x):
    """x * sigmoid(x) in one op (saves storing the sigmoid as a separate tensor)."""
    s = 0.5 * (x.xp.tanh(0.5 * x.data) + 1)
    out = x._result((x.data * s).astype(x.dtype, copy=False), (x,), "silu")

    def _backward():
        x._accumulate(out.grad * (s * (1 + x.data * (1 - s))).astype(x.dtype, copy=False))  # s (1 + x (1-s))
    out._backward = _backward
    return out


def gelu(x):
    """Exact GELU, x * Phi(x) with the erf, as PyTorch's default nn.GELU()."""
    out = x._result(kernels.gelu_forward(x.data), (x,), "gelu")

    def _backward():
        x._accumulate(kernels.gelu_backward(out.grad, x.data))   # Phi(x) + x phi(x)
    out._backward = _backward
    return out


def log_softmax(x, dim=-1):
    shifted = x.data - x.data.max(axis=dim, keepdims=True)     # subtract the max: no overflow
    logsumexp = x.xp.log(x.xp.exp(shifted).sum(axis=dim, keepdims=True))
    out = x._result(shifted - logsumexp, (x,), "log_softmax")

    def _backward():
        softmax_ = x.xp.exp(out.data)                            # d/dx_i = g_i - softmax_i * sum(g)
        x._accumulate(out.grad - softmax_ * out.grad.sum(axis=dim, keepdims=True))
    out._backward = _backward
    return out


def softmax(x, dim=-1):
    shifted = x.data - x.data.max(axis=dim, keepdims=True)
    e = x.xp.exp(shifted)
    out = x._result(e / e.sum(axis=dim, keepdims=True), (x,), "softmax")

    def _backward():
        s = out.data                                             # ds/dx: s * (g - sum(g * s))
        x._accumulate(s * (out.grad - (out.grad * s).sum(axis=dim, keepdims=True)))
    out._backward = _backward
    return out


# ---------------------------------------------------------------------------------------------
# Linear and convolution layers


def linear_forward(x, w, b):
    return kernels.linear_forward(x, w, b), (x, w)


def linear_backward(dout, cache, needs):
    x, w = cache
    dx = kernels.linear_backward_input(dout, w) if needs[0] else None    # dL/dx = dout W
    dw = kernels.linear_backward_weight(dout, x) if needs[1] else None   # dL/dW = dout^T x
    db = dout.sum(axis=0) if needs[2] else None
    return dx, dw, db


def linear(x, weight, bias=None):
    """x (..., in) @ weight (out, in)^T + bias (out,): one kernel, the bias added as it stores."""
    if weight.ndim != 2:
        raise ValueError(f"linear: weight must be 2-D (out, in), got shape {weight.shape}")
    if x.ndim < 2:
        raise ValueError(f"linear: input must have a batch axis and a feature axis (..., in), got shape {x.shape}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input shape {x.shape} does not fit weight shape {weight.shape} "
                         f"({x.shape[-1]} features against {weight.shape[1]})")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias shape {bias.shape} should be ({weight.shape[0]},)")
    _check_devices("linear", input=x, weight=weight, bias=bias)
    if x.ndim != 2:                              # (..., in) as rows: one GEMM, and one for dW
        rows = linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return rows.reshape(*x.shape[:-1], weight.shape[0])
    out, cache = linear_forward(x.data, weight.data, None if bias is None else bias.data)
    return _from_pair("linear", (x, weight, bias), out, cache, linear_backward)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _check_conv(name, x, weight, bias, stride, padding, in_axis, out_axis):
    _check_float(name, input=x, weight=weight, bias=bias)
    if x.ndim != 4:
        raise ValueError(f"{name}: input must be 4-D (N, C, H, W), got shape {x.shape}")
    if weight.ndim != 4:
        raise ValueError(f"{name}: weight must be 4-D, got shape {weight.shape}")
    if x.shape[1] != weight.shape[in_axis]:
        raise ValueError(f"{name}: input shape {x.shape} has {x.shape[1]} channels but weight shape "
                         f"{weight.shape} expects {weight.shape[in_axis]}")
    if bias is not None and bias.shape != (weight.shape[out_axis],):
        raise ValueError(f"{name}: bias shape {bias.shape} should be ({weight.shape[out_axis]},)")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{name}: input, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}"
                        + (f", {bias.dtype}" if bias is not None else ""))
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"{name}: stride must be a positive int, got {stride!r}")
    if not (isinstance(padding, int) and padding >= 0):
        raise ValueError(f"{name}: padding must be a non-negative int, got {padding!r}")


def _channel_sums(dout):
    """The bias gradient of a convolution: dout (N, C, H, W) summed to (C,). The batch axis first, in
    whole contiguous images: NumPy's sum over axes (0, 2, 3) at once is 2-10x slower at these sizes."""
    return dout.sum(axis=0).sum(axis=(1, 2))


def conv2d_forward(x, w, b, stride, padding):
    out = kernels.conv2d_forward(x, w, b, stride, padding)
    return out, (x, w, stride, padding)


def conv2d_backward(dout, cache, needs):
    x, w, stride, padding = cache
    dx = kernels.conv2d_backward_input(dout, w, x.shape[2:], stride, padding) if needs[0] else None
    dw = kernels.conv2d_backward_weight(dout, x, w.shape[2:], stride, padding) if needs[1] else None
    db = _channel_sums(dout) if needs[2] else None
    return dx, dw, db


def _check_kernel_fits(name, input, weight, padding):
    kh, kw = weight.shape[2:]
    h, w = input.shape[2:]
    if h + 2 * padding < kh or w + 2 * padding < kw:
        raise ValueError(f"{name}: kernel {kh}x{kw} is larger than the padded input {h + 2 * padding}x"
                         f"{w + 2 * padding} (input shape {input.shape}, padding {padding})")


def conv2d(input, weight, bias=None, stride=1, padding=0):
    """2-D convolution (cross-correlation, as PyTorch): weight (out, in, kh, kw)."""
    _check_conv("conv2d", input, weight, bias, stride, padding, in_axis=1, out_axis=0)
    _check_kernel_fits("conv2d", input, weight, padding)
    out, cache = conv2d_forward(input.data, weight.data, None if bias is None else bias.data, stride, padding)
    return _from_pair("conv2d", (input, weight, bias), out, cache, conv2d_backward)


def conv2d_add_forward(x, w, b, shift, residual, stride, padding):
    out = kernels.conv2d_add_forward(x, w, b, shift, residual, stride, padding)
    return out, (x, w, stride, padding)


def conv2d_add_backward(dout, cache, needs):
    dx, dw, db = conv2d_backward(dout, cache, needs[:3])
    dshift = dout.sum(axis=(2, 3)) if needs[3] else None       # d/dshift[n, o]: the sum over its pixels
    return dx, dw, db, dshift, dout if needs[4] else None      # d/dresidual = 1


def conv2d_add(input, weight, bias=None, stride=1, padding=0, shift=None, residual=None):
    """conv2d(input, weight, bias) + shift[:, :, None, None] + residual in one op: the two adds of a
    U-Net block (its time embedding, shift (N, out), and its skip connection, residual shaped like
    the output) happen as the convolution stores its output, not as two more passes over it."""
    _check_conv("conv2d_add", input, weight, bias, stride, padding, in_axis=1, out_axis=0)
    _check_float("conv2d_add", input=input, shift=shift, residual=residual)
    _check_kernel_fits("conv2d_add", input, weight, padding)
    n, o = input.shape[0], weight.shape[0]
    oh, ow = (kernels.conv_output_size(input.shape[a], weight.shape[a], stride, padding) for a in (2, 3))
    if shift is not None and shift.shape != (n, o):
        raise ValueError(f"conv2d_add: shift shape {shift.shape} should be (batch, out channels) = {(n, o)}")
    if residual is not None and residual.shape != (n, o, oh, ow):
        raise ValueError(f"conv2d_add: residual shape {residual.shape} should be the output's, {(n, o, oh, ow)}")
    for name, t in (("shift", shift), ("residual", residual)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"conv2d_add: {name} has dtype {t.dtype} but input has {input.dtype}")
    out, cache = conv2d_add_forward(input.data, weight.data, None if bias is None else bias.data,
                                    None if shift is None else shift.data,
                                    None if residual is None else residual.data, stride, padding)
    return _from_pair("conv2d_add", (input, weight, bias, shift, residual), out, cache, conv2d_add_backward)


def conv_transpose2d_forward(x, w, b, stride, padding):
    """The transposed convolution is the backward-input of a convolution with the same weight."""
    kh, kw = w.shape[2:]
    out_hw = ((x.shape[2] - 1) * stride - 2 * padding + kh, (x.shape[3] - 1) * stride - 2 * padding + kw)
    out = kernels.conv2d_backward_input(x, w, out_hw, stride, padding)
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out, (x, w, stride, padding)


def conv_transpose2d_backward(dout, cache, needs):
    x, w, stride, padding = cache
    dx = kernels.conv2d_forward(dout, w, None, stride, padding) if needs[0] else None
    dw = kernels.conv2d_backward_weight(x, dout, w.shape[2:], stride, padding) if needs[1] else None
    db = _channel_sums(dout) if needs[2] else None
    return dx, dw, db


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0):
    """Transposed convolution: weight (in, out, kh, kw), output (H-1)*stride - 2*padding + kh."""
    _check_conv("conv_transpose2d", input, weight, bias, stride, padding, in_axis=0, out_axis=1)
    kh, kw = weight.shape[2:]
    if (input.shape[2] - 1) * stride - 2 * padding + kh <= 0 or (input.shape[3] - 1) * stride - 2 * padding + kw <= 0:
        raise ValueError(f"conv_transpose2d: padding {padding} leaves no output for input shape "
                         f"{input.shape} and kernel {kh}x{kw}")
    out, cache = conv_transpose2d_forward(input.data, weight.data, None if bias is None else bias.data,
                                          stride, padding)
    return _from_pair("conv_transpose2d", (input, weight, bias), out, cache, conv_transpose2d_backward)


# ---------------------------------------------------------------------------------------------
# Pooling and resizing


def _scatter_taps(dcols, x_shape, kh, kw, stride, padding):
    """Add each window tap's gradient back where it was read: dcols (N, C, kh, kw, OH, OW)."""
    xp = backend.get_array_module(dcols)
    n, c, h, w = x_shape
    oh, ow = dcols.shape[4:]
    sh, sw = _pair(stride)
    dx = xp.zeros((n, c, max(h + 2 * padding, (oh - 1) * sh + kh),
                   max(w + 2 * padding, (ow - 1) * sw + kw)), dtype=dcols.dtype)
    for u in range(kh):
        for v in range(kw):
            dx[:, :, u:u + sh * oh:sh, v:v + sw * ow:sw] += dcols[:, :, u, v]
    return dx[:, :, padding:padding + h, padding:padding + w]


def _windows(x, kh, kw, stride, padding, pad_value):
    """(N, C, H, W) -> (N, C, OH, OW, kh*kw): the pooling windows, copied."""
    xp = backend.get_array_module(x)
    if padding:
        x = xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=pad_value)
    sh, sw = _pair(stride)
    cols = kernels.im2col(x, kh, kw, 1, 0)[:, ::sh, ::sw]        # (N, OH, OW, C, kh, kw)
    n, oh, ow, c = cols.shape[:4]
    return cols.transpose(0, 3, 1, 2, 4, 5).reshape(n, c, oh, ow, kh * kw)


def max_pool2d_forward(x, kernel_size, stride, padding):
    out, idx = kernels.max_pool2d_forward(x, kernel_size, _pair(stride), padding)   # idx: where each max is
    return out, (x.shape, idx, kernel_size, stride, padding)


def max_pool2d_backward(dout, cache, needs):
    x_shape, idx, kernel_size, stride, padding = cache             # d max/dx = 1 at the maximum
    return (kernels.max_pool2d_backward(dout, idx, x_shape[2:], kernel_size, _pair(stride), padding),)


def _check_pool(name, x, kernel_size, stride, padding):
    if x.ndim != 4:
        raise ValueError(f"{name}: input must be 4-D (N, C, H, W), got shape {x.shape}")
    kh, kw = _pair(kernel_size)
    stride = (kh, kw) if stride is None else _pair(stride)       # default: windows do not overlap
    if kh < 1 or kw < 1 or min(stride) < 1 or padding < 0:
        raise ValueError(f"{name}: bad kernel_size {kernel_size}, stride {stride} or padding {padding}")
    if padding * 2 > min(kh, kw):
        raise ValueError(f"{name}: padding {padding} must be at most half the kernel size {(kh, kw)}")
    if x.shape[2] + 2 * padding < kh or x.shape[3] + 2 * padding < kw:
        raise ValueError(f"{name}: kernel {(kh, kw)} is larger than the input {x.shape[2:]}")
    return (kh, kw), stride


def max_pool2d(input, kernel_size, stride=None, padding=0):
    kernel_size, stride = _check_pool("max_pool2d", input, kernel_size, stride, padding)
    out, cache = max_pool2d_forward(input.data, kernel_size, stride, padding)
    return _from_pair("max_pool2d", (input,), out, cache, max_pool2d_backward)


def avg_pool2d_forward(x, kernel_size, stride, padding):
    kh, kw = kernel_size
    out = _windows(x, kh, kw, stride, padding, 0).mean(axis=-1)  # zero padding counts, as PyTorch
    return out, (x.shape, kernel_size, stride, padding)


def avg_pool2d_backward(dout, cache, needs):
    x_shape, (kh, kw), stride, padding = cache
    xp = backend.get_array_module(dout)
    share = dout * dout.dtype.type(1.0 / (kh * kw))             # d mean/dx_i = 1/k for each tap
    dcols = xp.broadcast_to(share[:, :, None, None], dout.shape[:2] + (kh, kw) + dout.shape[2:])
    return (_scatter_taps(dcols, x_shape, kh, kw, stride, padding),)


def avg_pool2d(input, kernel_size, stride=None, padding=0):
    kernel_size, stride = _check_pool("avg_pool2d", input, kernel_size, stride, padding)
    out, cache = avg_pool2d_forward(input.data, kernel_size, stride, padding)
    return _from_pair("avg_pool2d", (input,), out, cache, avg_pool2d_backward)


def upsample_nearest2d(input, scale_factor=2):
    """Repeat each pixel scale_factor times along H and W."""
    s = int(scale_factor)
    if input.ndim != 4:
        raise ValueError(f"upsample_nearest2d: input must be 4-D (N, C, H, W), got shape {input.shape}")
    if s < 1 or s != scale_factor:
        raise ValueError(f"upsample_nearest2d: scale_factor must be a positive integer, got {scale_factor}")
    n, c, h, w = input.shape
    out = input._result(input.data.repeat(s, axis=2).repeat(s, axis=3), (input,), "upsample_nearest2d")

    def _backward():                                             # each input pixel feeds s*s outputs:
        g = out.grad.reshape(n, c, h, s, w * s)                  # add the s rows of each block, then the
        rows = sum(g[:, :, :, i] for i in range(s)).reshape(n, c, h, w, s)    # s columns (strided adds:
        input._accumulate(sum(rows[..., j] for j in range(s)))   # NumPy's sum over small axes is slow)
    out._backward = _backward
    return out


def pad(input, pad, mode="constant", value=0.0):
    """Constant padding; `pad` lists (before, after) pairs from the last axis backwards, as PyTorch."""
    if mode != "constant":
        raise ValueError(f"pad: only mode 'constant' is implemented, got {mode!r}")
    if len(pad) % 2 or len(pad) // 2 > input.ndim:
        raise ValueError(f"pad: needs pairs for at most {input.ndim} axes, got {pad}")
    widths = [(0, 0)] * input.ndim
    for i in range(len(pad) // 2):
        widths[input.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    if any(a < 0 or b < 0 for a, b in widths):
        raise ValueError(f"pad: negative padding {pad} is not supported")
    out = input._result(input.xp.pad(input.data, widths, constant_values=value), (input,), "pad")

    def _backward():
        inner = tuple(slice(a, a + n) for (a, _), n in zip(widths, input.shape))
        input._accumulate(out.grad[inner])                       # the padding gets no gradient
    out._backward = _backward
    return out


# ---------------------------------------------------------------------------------------------
# Normalisation


# Group norm (Wu & He 2018) normalises each sample's group of C/G channels. On the CPU it is one
# kernel, alone or fused with the SiLU that follows it in the UNet (kernels.group_norm_silu_*: the
# C++ kernel where built, else its NumPy reference); its cache is x itself with mean and inv_std
# (N, G), from which the backward recomputes xhat and y.

def group_norm_silu_forward(x, num_groups, w, b, eps, silu):
    out, mean, inv_std = kernels.group_norm_silu_forward(x, num_groups, w, b, eps, silu)
    return out, (x, mean, inv_std, num_groups, w, b, silu)


def group_norm_silu_backward(dout, cache, needs):
    x, mean, inv_std, num_groups, w, b, silu = cache          # dy = dout silu'(y), then group norm's backward
    dx, dw, db = kernels.group_norm_silu_backward(dout, x, mean, inv_std, num_groups, w, b, silu)
    return dx, dw if needs[1] else None, db if needs[2] else None


# On the GPU (CuPy), group norm is the training-mode batch norm of the (1, N*G, C/G * H * W) view,
# whose "channels" are the (sample, group) pairs, on the CUDA batch-norm kernels; only its affine
# is per channel of x, so that is applied here. SiLU there stays a separate op (no CUDA kernel fuses them).

def group_norm_forward(x, num_groups, w, b, eps):
    n, c = x.shape[:2]
    xg = x.reshape(1, n * num_groups, -1)                        # (1, N*G, C/G * H * W)
    _, xhat, _, _, inv_std = kernels.batch_norm_forward_train(xg, None, None, eps)   # inv_std (N*G,)
    xhat = xhat.reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    out = xhat * w.reshape(shape) if w is not None else xhat
    out = out + b.reshape(shape) if b is not None else out
    return out, (xhat, inv_std, w, num_groups)


def group_norm_backward(dout, cache, needs):
    xhat, inv_std, w, num_groups = cache
    n, c = xhat.shape[:2]
    axes = (0,) + tuple(range(2, xhat.ndim))
    dw = (dout * xhat).sum(axis=axes) if needs[1] else None
    db = dout.sum(axis=axes) if needs[2] else None
    dxhat = dout * w.reshape((1, c) + (1,) * (xhat.ndim - 2)) if w is not None else dout
    dx, _, _ = kernels.batch_norm_backward_train(dxhat.reshape(1, n * num_groups, -1),
                                                 xhat.reshape(1, n * num_groups, -1), inv_std, None)
    return dx.reshape(xhat.shape), dw, db


def _group_norm(name, input, num_groups, weight, bias, eps, then_silu):
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{name}: num_groups must be a positive int, got {num_groups!r}")
    if input.ndim < 2 or input.shape[1] % num_groups:
        raise ValueError(f"{name}: {num_groups} groups do not divide the channels of shape {input.shape}")
    _check_float(name, input=input, weight=weight, bias=bias)
    _check_channels(name, input, weight=weight, bias=bias)
    w, b = (None if t is None else t.data for t in (weight, bias))
    if backend.is_cupy_array(input.data):
        out, cache = group_norm_forward(input.data, num_groups, w, b, eps)
        out = _from_pair("group_norm", (input, weight, bias), out, cache, group_norm_backward)
        return silu(out) if then_silu else out
    out, cache = group_norm_silu_forward(input.data, num_groups, w, b, eps, then_silu)
    return _from_pair(name, (input, weight, bias), out, cache, group_norm_silu_backward)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return _group_norm("group_norm", input, num_groups, weight, bias, eps, then_silu=False)


def group_norm_silu(input, num_groups, weight=None, bias=None, eps=1e-5):
    """silu(group_norm(input, ...)) as one op (the UNet's GroupNorm -> SiLU), with group_norm's arguments."""
    return _group_norm("group_norm_silu", input, num_groups, weight, bias, eps, then_silu=True)


def _batch_statistics(x, running_mean, running_var, w, b, momentum, eps, forward_train):
    """Training mode: forward_train(x, w, b, eps) -> (out, xhat, mean, var, inv_std), and the
    running statistics updated in place (with the unbiased variance, as PyTorch)."""
    out, xhat, mean, var, inv_std = forward_train(x, w, b, eps)
    if running_mean is not None:
        count = x.size // x.shape[1]
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += momentum * var * (count / max(count - 1, 1))
    return out, xhat, inv_std


def batch_norm_forward(x, running_mean, running_var, w, b, training, momentum, eps):
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)                # per-channel values broadcast
    if training:                                                 # statistics of this batch, per channel
        out, xhat, inv_std = _batch_statistics(x, running_mean, running_var, w, b, momentum, eps,
                                               kernels.batch_norm_forward_train)
        return out, (xhat, inv_std, w, training)
    inv_std = 1 / backend.get_array_module(x).sqrt(running_var + eps)   # eval: the running statistics
    xhat = (x - running_mean.reshape(shape)) * inv_std.reshape(shape)
    out = xhat * w.reshape(shape) if w is not None else xhat
    out = out + b.reshape(shape) if b is not None else out
    return out, (xhat, inv_std, w, training)


def batch_norm_backward(dout, cache, needs):
    xhat, inv_std, w, training = cache                           # inv_std, w: (C,)
    if training:                                                 # the statistics depend on x: one fused call
        dx, dw, db = kernels.batch_norm_backward_train(dout, xhat, inv_std, w)
        return dx, dw if needs[1] else None, db if needs[2] else None
    # eval: the statistics are constants, so dx = dout * w * inv_std
    shape = (1, xhat.shape[1]) + (1,) * (xhat.ndim - 2)
    axes = (0,) + tuple(range(2, xhat.ndim))
    dw = (dout * xhat).sum(axis=axes) if needs[1] else None
    db = dout.sum(axis=axes) if needs[2] else None
    scale = inv_std * w if w is not None else inv_std
    return dout * scale.reshape(shape), dw, db


def _check_batch_norm(name, input, running_mean, running_var, weight, bias, training):
    if input.ndim < 2:
        raise ValueError(f"{name}: input must have a channel axis, got shape {input.shape}")
    if not training and running_mean is None:
        raise ValueError(f"{name}: eval mode needs running_mean and running_var")
    if training and input.size() // input.shape[1] <= 1:
        raise ValueError(f"{name}: training needs more than one value per channel, got shape {input.shape}")
    _check_float(name, input=input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    _check_channels(name, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch norm over (N, C, ...). running_mean/var are Tensors (or None), updated in place when training."""
    _check_batch_norm("batch_norm", input, running_mean, running_var, weight, bias, training)
    raw = [None if t is None else t.data for t in (running_mean, running_var, weight, bias)]
    out, cache = batch_norm_forward(input.data, *raw, training, momentum, eps)
    return _from_pair("batch_norm", (input, weight, bias), out, cache, batch_norm_backward)


# gelu(batch_norm(x)) in training mode, as one op: one kernel forward, one backward (the GELU's
# input y = xhat w + b is recomputed there rather than stored). In eval mode, the two ops in a row.

def batch_norm_gelu_backward(dout, cache, needs):
    xhat, inv_std, w, b = cache
    dx, dw, db = kernels.batch_norm_gelu_backward_train(dout, xhat, inv_std, w, b)   # dy = dout gelu'(y), then as above
    return dx, dw if needs[1] else None, db if needs[2] else None


def batch_norm_gelu(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5):
    """gelu(batch_norm(input, ...)), with the arguments of batch_norm."""
    if not training:
        wants_grad = is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
        if wants_grad or running_mean is None:
            return gelu(batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))
        _check_batch_norm("batch_norm_gelu", input, running_mean, running_var, weight, bias, training)
        xp = backend.get_array_module(input.data)                # sampling: one pass, gelu(x scale + shift)
        scale = 1 / xp.sqrt(running_var.data + eps)              # (C,)
        scale = scale * weight.data if weight is not None else scale
        shift = -running_mean.data * scale
        shift = shift + bias.data if bias is not None else shift
        out = kernels.batch_norm_gelu_forward_eval(input.data, scale.astype(input.dtype), shift.astype(input.dtype))
        return input._result(out, (input,), "batch_norm_gelu")
    _check_batch_norm("batch_norm_gelu", input, running_mean, running_var, weight, bias, training)
    rm, rv, w, b = [None if t is None else t.data for t in (running_mean, running_var, weight, bias)]
    out, xhat, inv_std = _batch_statistics(input.data, rm, rv, w, b, momentum, eps,
                                           kernels.batch_norm_gelu_forward_train)
    return _from_pair("batch_norm_gelu", (input, weight, bias), out, (xhat, inv_std, w, b), batch_norm_gelu_backward)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalise over the last len(normalized_shape) axes, built from Tensor primitives."""
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if input.shape[-len(normalized_shape):] != normalized_shape:
        raise ValueError(f"layer_norm: input shape {input.shape} does not end in {normalized_shape}")
    axes = tuple(range(input.ndim - len(normalized_shape), input.ndim))
    centered = input - input.mean(axis=axes, keepdims=True)
    out = centered * (centered.var(axis=axes, keepdims=True, correction=0) + eps) ** -0.5
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


# ---------------------------------------------------------------------------------------------
# Attention (Vaswani et al. 2017, arXiv:1706.03762)


def scaled_dot_product_attention(q, k, v, key_padding_mask=None):
    """softmax(q k^T / sqrt(d)) v  (Vaswani et al. eq. 1), built from matmul, where and softmax.

    q (B, ..., Lq, d), k (B, ..., Lk, d), v (B, ..., Lk, dv) -> (B, ..., Lq, dv); the middle axes
    (heads) broadcast. key_padding_mask (B, Lk) bool, True where key j of sample b is padding: its
    score becomes -inf, so its weight is exp(-inf) = 0 for every query, and where's backward gives it
    no gradient (ds/dx = s (g - sum g s) is 0 where s is 0). A row with every key masked would be
    0/0; it is refused (a prompt always keeps its BOS token).
    """
    _check_float("scaled_dot_product_attention", q=q, k=k, v=v)
    if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim or q.shape[-1] != k.shape[-1] \
            or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"scaled_dot_product_attention: q {q.shape}, k {k.shape}, v {v.shape} must be "
                         f"(B, ..., Lq, d), (B, ..., Lk, d), (B, ..., Lk, dv)")
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))    # (B, ..., Lq, Lk)
    if key_padding_mask is not None:
        mask = key_padding_mask.data if isinstance(key_padding_mask, Tensor) else key_padding_mask
        b, lk = q.shape[0], k.shape[-2]
        if getattr(mask, "dtype", None) != bool or mask.shape != (b, lk):
            raise ValueError(f"scaled_dot_product_attention: key_padding_mask must be ({b}, {lk}) bool, "
                             f"got shape {getattr(mask, 'shape', None)} dtype {getattr(mask, 'dtype', None)}")
        if backend.device_of(mask) != q.device:
            raise ValueError(f"scaled_dot_product_attention: key_padding_mask is on {backend.device_of(mask)}, "
                             f"q on {q.device}")
        every = mask.all(axis=1)
        if every.any():
            raise ValueError(f"scaled_dot_product_attention: key_padding_mask masks every key of sample "
                             f"{int(every.argmax())}: its queries would see nothing (keep at least one key, "
                             f"e.g. BOS)")
        mask = mask.reshape((b,) + (1,) * (q.ndim - 2) + (lk,))              # (B, 1, .., 1, Lk)
        scores = where(mask, -math.inf, scores)                              # masked: weight exp(-inf) = 0
    return softmax(scores, dim=-1) @ v                                       # (B, ..., Lq, dv)


# ---------------------------------------------------------------------------------------------
# Regularisation, lookup, losses


def dropout(input, p=0.5, training=True):
    """Zero each element with probability p and scale the rest by 1/(1-p) (inverted dropout)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return input
    keep = philox.default_generator().random(input.shape, "float64", input.xp) >= p   # the same masks on CPU and GPU
    return input * Tensor(keep.astype(input.dtype) * input.dtype.type(1 / (1 - p)))


def embedding(input, weight):
    """Rows of weight (num_embeddings, dim) picked by the integer indices in input."""
    idx = input.data if isinstance(input, Tensor) else input
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding: indices must be integers, got dtype {idx.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must be 2-D (num_embeddings, dim), got shape {weight.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= weight.shape[0]):
        raise IndexError(f"embedding: index out of range [0, {weight.shape[0]}): min {idx.min()}, max {idx.max()}")
    return weight[idx]


def mse_loss(input, target, reduction="mean"):
    if input.shape != target.shape:
        raise ValueError(f"mse_loss: input shape {input.shape} != target shape {target.shape}")
    sq = (input - target) ** 2
    return sq.mean() if reduction == "mean" else sq.sum() if reduction == "sum" else sq


def cross_entropy(input, target, reduction="mean"):
    """input (N, classes) logits, target (N,) integer class indices."""
    idx = target.data if isinstance(target, Tensor) else target
    if input.ndim != 2 or idx.shape != (input.shape[0],):
        raise ValueError(f"cross_entropy: input shape {input.shape} must be (N, classes) and target "
                         f"shape {idx.shape} must be (N,)")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integer classes, got dtype {idx.dtype}")
    _check_float("cross_entropy", input=input)
    if idx.size and (idx.min() < 0 or idx.max() >= input.shape[1]):
        raise IndexError(f"cross_entropy: target class out of range [0, {input.shape[1]})")
    picked = -log_softmax(input, dim=1)[input.xp.arange(input.shape[0]), idx]
    return picked.mean() if reduction == "mean" else picked.sum() if reduction == "sum" else picked
