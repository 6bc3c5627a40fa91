"""The hot paths, as plain NumPy/CuPy reference code, and the switch to the compiled kernels.

Each function here is the specification of a kernel in csrc/: the C++ (`tinydiff._C`) and
CUDA (`tinydiff._C_cuda`) versions must give the same numbers, and tests check that they do.
The public functions at the bottom choose: compiled kernels when they are built and selected
(`TINYDIFF_KERNELS=native`, the default), else the reference. `set_conv_version(name)` picks one
of the compiled convolution versions (`tinydiff._C.conv2d_versions()`; the first, the fastest,
is the default), so that tests and benchmarks can run each.

Convolution (NCHW; weight (out, in, kh, kw) as in PyTorch; stride s, zero padding p):
    out[n, o, i, j] = b[o] + sum_{c, u, v} w[o, c, u, v] * x_pad[n, c, s*i + u, s*j + v]
    output size: H_out = (H + 2p - kh) // s + 1
    conv2d_add: the same + shift[n, o] + residual[n, o, i, j], a U-Net block's time embedding and
    skip connection added as the convolution is stored
The transposed convolution needs no kernel of its own: its forward is conv2d's backward-input.

Linear (nn.Linear), rows x (N, I), weight w (O, I):  y = x w^T + b,  dx = dout w,  dw = dout^T x

Diffusion steps (per-sample coefficients, arrays of shape (B,), broadcast over C, H, W):
    q_sample:  xt = sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * eps                (DDPM eq. 4)
    ddpm_step: x_prev = 1/sqrt(alpha) * (xt - beta/sqrt(1-alpha_bar) * eps) + sigma*z (DDPM eq. 11)
    ddim_step: x0 = (xt - sqrt(1-alpha_bar) eps) / sqrt(alpha_bar), optionally clipped to [-1, 1]
               x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1-alpha_bar_prev-sigma^2) eps + sigma z
                                                                                    (DDIM eq. 12)
    guidance:  eps = eps_uncond + s * (eps_cond - eps_uncond)  (classifier-free guidance,
               fused into the two updates when eps_uncond is given)

Batch norm in training mode (Ioffe & Szegedy 2015, arXiv:1502.03167, Alg. 1), x (N, C, ...),
statistics per channel c over the M = N * H * W ... values of that channel:
    mean_c = sum x / M,  var_c = sum (x - mean_c)^2 / M,  xhat = (x - mean_c) / sqrt(var_c + eps)
    out = xhat w_c + b_c
    backward: db_c = sum dout, dw_c = sum dout xhat, dx = inv_std_c w_c (dout - db_c/M - xhat dw_c/M)

Group norm (Wu & He 2018, arXiv:1803.08494), then SiLU, x (N, C, ...), statistics per sample n and
group g of C/G channels: xhat = (x - mean_ng) / sqrt(var_ng + eps), y = xhat w_c + b_c,
    out = silu(y) = y sigmoid(y);  backward: dy = dout silu'(y), then batch norm's within the group

Adam / AdamW, one step t over all parameters (Kingma & Ba 2015, Alg. 1; Loshchilov & Hutter 2019,
Alg. 2), per element:
    g = g + wd p (Adam)  or  p = p (1 - lr wd) (AdamW);  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""
import math

import numpy as np

from tinydiff import backend


def _xp(a):
    return backend.get_array_module(a)


# ---------------------------------------------------------------------------------------------
# Convolution: reference (im2col with stride tricks + one matrix product)


def conv_output_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x, kh, kw, stride, padding):
    """(N, C, H, W) -> (N, OH, OW, C, kh, kw): every receptive field, as a strided view."""
    xp = _xp(x)
    if padding:
        x = xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    n, c, h, w = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    sn, sc, sh, sw = x.strides
    return xp.lib.stride_tricks.as_strided(
        x, shape=(n, oh, ow, c, kh, kw), strides=(sn, sh * stride, sw * stride, sc, sh, sw))


def conv2d_forward_ref(x, w, b, stride, padding):
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) or None -> out (N, O, OH, OW)."""
    o, c, kh, kw = w.shape
    cols = im2col(x, kh, kw, stride, padding)                     # (N, OH, OW, C, kh, kw)
    n, oh, ow = cols.shape[:3]
    out = cols.reshape(n * oh * ow, c * kh * kw) @ w.reshape(o, -1).T   # (N*OH*OW, O)
    if b is not None:
        out += b
    return out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)       # (N, O, OH, OW)


def _add_shift_residual(out, shift, residual):
    """out (N, O, OH, OW) + shift (N, O) per sample and channel + residual (N, O, OH, OW); either may be None."""
    if shift is not None:
        out = out + shift[:, :, None, None]
    return out if residual is None else out + residual


def conv2d_add_forward_ref(x, w, b, shift, residual, stride, padding):
    return _add_shift_residual(conv2d_forward_ref(x, w, b, stride, padding), shift, residual)


def conv2d_backward_input_ref(dout, w, input_hw, stride, padding):
    """dout (N, O, OH, OW), w (O, C, kh, kw) -> dx (N, C, H, W), H, W = input_hw."""
    xp = _xp(dout)
    n, o, oh, ow = dout.shape
    _, c, kh, kw = w.shape
    h, wid = input_hw
    dcols = dout.transpose(0, 2, 3, 1).reshape(-1, o) @ w.reshape(o, -1)   # (N*OH*OW, C*kh*kw)
    dcols = dcols.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)  # (N, C, kh, kw, OH, OW)
    # col2im: each kernel tap (u, v) adds its slice back where it was read from
    hp, wp = h + 2 * padding, wid + 2 * padding
    dx = xp.zeros((n, c, max(hp, (oh - 1) * stride + kh), max(wp, (ow - 1) * stride + kw)),
                  dtype=dout.dtype)
    for u in range(kh):
        for v in range(kw):
            dx[:, :, u:u + stride * oh:stride, v:v + stride * ow:stride] += dcols[:, :, u, v]
    return xp.ascontiguousarray(dx[:, :, padding:padding + h, padding:padding + wid])


# Winograd's F(2x2, 3x3) (Lavin & Gray 2016, arXiv:1509.09308, eq. 8), the algorithm of the "winograd"
# version (csrc/conv2d_winograd_cpu.cpp): the same stride-1 3x3 convolution with 16 multiplies per
# 2x2 outputs instead of 36. d: a 4x4 input patch, g: a 3x3 kernel.
WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)   # B^T d B
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])                      # G g G^T
WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)                               # A^T M A


def winograd_conv3x3_ref(x, w, b, padding):
    """conv2d_forward_ref(x, w, b, 1, padding) for 3x3 kernels, computed as
    Y = A^T [ sum_c (G g G^T) * (B^T d B) ] A for every 2x2 block of outputs (d: its 4x4 patch)."""
    n, c, h, wd = x.shape
    oh, ow = h + 2 * padding - 2, wd + 2 * padding - 2
    th, tw = -(-oh // 2), -(-ow // 2)                             # tiles of 2x2 outputs, the last ones cut
    xp = np.zeros((n, c, 2 * th + 2, 2 * tw + 2))
    xp[:, :, padding:padding + h, padding:padding + wd] = x
    rows, cols = 2 * np.arange(th)[:, None] + np.arange(4), 2 * np.arange(tw)[:, None] + np.arange(4)
    d = xp[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # (N, C, th, tw, 4, 4) patches
    V = WINOGRAD_BT @ d @ WINOGRAD_BT.T                           # the data transform
    U = WINOGRAD_G @ w @ WINOGRAD_G.T                             # (O, C, 4, 4), the filter transform
    M = np.einsum("ocij,nctsij->notsij", U, V)                    # 16 products per channel pair, summed over c
    Y = WINOGRAD_AT @ M @ WINOGRAD_AT.T                           # (N, O, th, tw, 2, 2)
    out = Y.transpose(0, 1, 2, 4, 3, 5).reshape(n, -1, 2 * th, 2 * tw)[:, :, :oh, :ow]
    return out + (0 if b is None else b.reshape(-1, 1, 1))


def conv2d_backward_weight_ref(dout, x, kernel_hw, stride, padding):
    """dout (N, O, OH, OW), x (N, C, H, W) -> dw (O, C, kh, kw)."""
    kh, kw = kernel_hw
    n, o, oh, ow = dout.shape
    c = x.shape[1]
    cols = im2col(x, kh, kw, stride, padding)[:, :oh, :ow]       # (N, OH, OW, C, kh, kw)
    dw = dout.transpose(1, 0, 2, 3).reshape(o, -1) @ cols.reshape(n * oh * ow, c * kh * kw)
    return dw.reshape(o, c, kh, kw)


# ---------------------------------------------------------------------------------------------
# Diffusion steps: reference


def _per_sample(coef, x):
    """(B,) coefficients -> (B, 1, 1, 1) so they broadcast over one sample's pixels."""
    return coef.reshape((-1,) + (1,) * (x.ndim - 1))


def guided_eps_ref(eps_cond, eps_uncond, guidance_scale):
    """Classifier-free guidance: eps = eps_uncond + s (eps_cond - eps_uncond); s = 1 is eps_cond."""
    if eps_uncond is None:
        return eps_cond
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def q_sample_ref(x0, eps, sqrt_alpha_bar, sqrt_one_minus_alpha_bar):
    """DDPM eq. 4: xt = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    return _per_sample(sqrt_alpha_bar, x0) * x0 + _per_sample(sqrt_one_minus_alpha_bar, x0) * eps


def ddpm_step_ref(xt, eps, z, coef_x, coef_eps, sigma, eps_uncond=None, guidance_scale=1.0):
    """DDPM eq. 11 / Alg. 2 line 4: x_prev = coef_x (xt - coef_eps eps) + sigma z,
    coef_x = 1/sqrt(alpha_t), coef_eps = beta_t / sqrt(1 - alpha_bar_t)."""
    eps = guided_eps_ref(eps, eps_uncond, guidance_scale)
    return _per_sample(coef_x, xt) * (xt - _per_sample(coef_eps, xt) * eps) + _per_sample(sigma, xt) * z


def ddim_step_ref(xt, eps, z, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, sqrt_alpha_bar_prev,
                  dir_coef, sigma, clip_x0=False, eps_uncond=None, guidance_scale=1.0):
    """DDIM eq. 12, with dir_coef = sqrt(1 - alpha_bar_prev - sigma^2). Returns (x_prev, x0)."""
    eps = guided_eps_ref(eps, eps_uncond, guidance_scale)
    x0 = (xt - _per_sample(sqrt_one_minus_alpha_bar, xt) * eps) / _per_sample(sqrt_alpha_bar, xt)
    if clip_x0:
        x0 = _xp(x0).clip(x0, -1, 1)
    x_prev = (_per_sample(sqrt_alpha_bar_prev, xt) * x0 + _per_sample(dir_coef, xt) * eps
              + _per_sample(sigma, xt) * z)
    return x_prev, x0


# ---------------------------------------------------------------------------------------------
# Dispatch: the compiled kernel for the array's device when built and selected, else the reference


def _contiguous(*arrays):
    """The compiled kernels take C-contiguous arrays only; autograd hands them views (the slices
    of cat's backward, transposes), so copy those here, in the open, and nothing else."""
    return [a if a is None else _xp(a).ascontiguousarray(a) for a in arrays]


def compiled_module(array):
    """The compiled kernel module for this array's device, or None for the reference."""
    if backend.get_kernels() != "native":
        return None
    return backend.cuda_kernels() if backend.is_cupy_array(array) else backend.native


def _compiled(name, *arrays):
    """The compiled kernel `name` for these arrays, or None: then the reference runs. The compiled
    kernels take non-empty float32 or float64 arrays of one dtype; anything else (float16, an
    empty batch) goes to the NumPy reference rather than to an error."""
    mod = compiled_module(arrays[0])
    if mod is None or not hasattr(mod, name):
        return None
    dtype = arrays[0].dtype
    if dtype not in (np.float32, np.float64) or any(a.dtype != dtype or a.size == 0 for a in arrays if a is not None):
        return None
    return getattr(mod, name)


# The convolution version each compiled module runs: None is the module's default (the first of
# its conv2d_versions(), the fastest). Benchmarks and tests switch with set_conv_version.
conv_version = {"cpu": None, "cuda": None}


def set_conv_version(name, device="cpu"):
    """Run the compiled convolutions of `device` ('cpu' or 'cuda') with version `name`, one of
    that module's conv2d_versions(), or None for its default."""
    if device not in conv_version:
        raise ValueError(f"set_conv_version: device must be 'cpu' or 'cuda', got {device!r}")
    if name is not None:
        mod = backend.native if device == "cpu" else backend.cuda_kernels()
        if mod is None:
            raise RuntimeError(f"set_conv_version: no compiled kernels are built for {device}")
        if name not in mod.conv2d_versions():
            raise ValueError(f"set_conv_version: {device} has versions {mod.conv2d_versions()}, not {name!r}")
    conv_version[device] = name


def _version(array):
    name = conv_version[backend.device_of(array)]
    return {} if name is None else {"version": name}


def conv2d_forward(x, w, b, stride, padding):
    kernel = _compiled("conv2d_forward", x, w, b)
    if kernel is not None:
        return kernel(*_contiguous(x, w, b), stride, padding, **_version(x))
    return conv2d_forward_ref(x, w, b, stride, padding)


def conv2d_add_forward(x, w, b, shift, residual, stride, padding):
    """The compiled kernel adds shift and residual as it stores the convolution; elsewhere (CUDA,
    NumPy) the device's own convolution runs, then the two adds."""
    kernel = _compiled("conv2d_add_forward", x, w, b, shift, residual)
    if kernel is not None:
        return kernel(*_contiguous(x, w, b, shift, residual), stride, padding, **_version(x))
    return _add_shift_residual(conv2d_forward(x, w, b, stride, padding), shift, residual)


def conv2d_backward_input(dout, w, input_hw, stride, padding):
    kernel = _compiled("conv2d_backward_input", dout, w)
    if kernel is not None:
        return kernel(*_contiguous(dout, w), tuple(input_hw), stride, padding, **_version(dout))
    return conv2d_backward_input_ref(dout, w, input_hw, stride, padding)


def conv2d_backward_weight(dout, x, kernel_hw, stride, padding):
    kernel = _compiled("conv2d_backward_weight", dout, x)
    if kernel is not None:
        return kernel(*_contiguous(dout, x), tuple(kernel_hw), stride, padding, **_version(dout))
    return conv2d_backward_weight_ref(dout, x, kernel_hw, stride, padding)


# Linear (nn.Linear): rows x (N, I), weight w (O, I), bias b (O,)
#   forward y = x w^T + b;  backward dx = dout w,  dw = dout^T x,  db = the column sums of dout


def linear_forward_ref(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def linear_backward_input_ref(dout, w):
    return dout @ w


def linear_backward_weight_ref(dout, x):
    return dout.T @ x


def linear_forward(x, w, b):
    kernel = _compiled("linear_forward", x, w, b)
    if kernel is not None:
        return kernel(*_contiguous(x, w, b))
    return linear_forward_ref(x, w, b)


def linear_backward_input(dout, w):
    kernel = _compiled("linear_backward_input", dout, w)
    if kernel is not None:
        return kernel(*_contiguous(dout, w))
    return linear_backward_input_ref(dout, w)


def linear_backward_weight(dout, x):
    kernel = _compiled("linear_backward_weight", dout, x)
    if kernel is not None:
        return kernel(*_contiguous(dout, x))
    return linear_backward_weight_ref(dout, x)


def q_sample(x0, eps, sqrt_alpha_bar, sqrt_one_minus_alpha_bar):
    kernel = _compiled("q_sample", x0, eps, sqrt_alpha_bar, sqrt_one_minus_alpha_bar)
    if kernel is not None:
        return kernel(*_contiguous(x0, eps, sqrt_alpha_bar, sqrt_one_minus_alpha_bar))
    return q_sample_ref(x0, eps, sqrt_alpha_bar, sqrt_one_minus_alpha_bar)


def ddpm_step(xt, eps, z, coef_x, coef_eps, sigma, eps_uncond=None, guidance_scale=1.0):
    kernel = _compiled("ddpm_step", xt, eps, z, coef_x, coef_eps, sigma, eps_uncond)
    if kernel is not None:
        return kernel(*_contiguous(xt, eps, z, coef_x, coef_eps, sigma, eps_uncond), guidance_scale)
    return ddpm_step_ref(xt, eps, z, coef_x, coef_eps, sigma, eps_uncond, guidance_scale)


def ddim_step(xt, eps, z, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, sqrt_alpha_bar_prev, dir_coef,
              sigma, clip_x0=False, eps_uncond=None, guidance_scale=1.0):
    """Returns (x_prev, x0)."""
    arrays = (xt, eps, z, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, sqrt_alpha_bar_prev, dir_coef, sigma)
    kernel = _compiled("ddim_step", *arrays, eps_uncond)
    if kernel is not None:
        *arrays, eps_uncond = _contiguous(*arrays, eps_uncond)
        return kernel(*arrays, bool(clip_x0), eps_uncond, guidance_scale)
    return ddim_step_ref(*arrays, clip_x0, eps_uncond, guidance_scale)


# ---------------------------------------------------------------------------------------------
# GELU (exact erf form, as PyTorch's default): gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
# NumPy has no erf, so the reference fits one once: a Chebyshev series on [0, 6] through the
# values of Python's math.erf (max error 4e-15); erf(x) = 1 to double precision for x >= 6.

def _fit_erf(degree=40, top=6.0):
    import math
    nodes = np.cos(np.pi * (np.arange(4 * degree) + 0.5) / (4 * degree))   # Chebyshev nodes in [-1, 1]
    values = [math.erf((u + 1) / 2 * top) for u in nodes]
    return np.polynomial.chebyshev.chebfit(nodes, values, degree), top


_ERF_COEFS, _ERF_TOP = _fit_erf()


def erf(x):
    """The error function, accurate to about 4e-15, for NumPy or CuPy arrays."""
    xp = _xp(x)
    u = xp.minimum(xp.abs(x).astype(np.float64), _ERF_TOP) * (2 / _ERF_TOP) - 1   # map [0, 6] -> [-1, 1]
    c = _ERF_COEFS
    b1, b2 = xp.zeros_like(u), xp.zeros_like(u)          # Clenshaw's recurrence for sum c_k T_k(u)
    for ck in c[:0:-1]:
        b1, b2 = 2 * u * b1 - b2 + ck, b1
    return (xp.sign(x) * (u * b1 - b2 + c[0])).astype(x.dtype, copy=False)


def gelu_forward_ref(x):
    return 0.5 * x * (1 + erf(x * np.float64(0.5 ** 0.5).astype(x.dtype)))


def gelu_backward_ref(dout, x):
    """d gelu/dx = Phi(x) + x phi(x), phi the standard normal density."""
    xp = _xp(x)
    cdf = 0.5 * (1 + erf(x * np.float64(0.5 ** 0.5).astype(x.dtype)))
    pdf = xp.exp(-0.5 * x * x) * x.dtype.type(1 / np.sqrt(2 * np.pi))
    return dout * (cdf + x * pdf)


def gelu_forward(x):
    kernel = _compiled("gelu_forward", x)
    if kernel is not None:
        return kernel(*_contiguous(x))
    return gelu_forward_ref(x)


def gelu_backward(dout, x):
    kernel = _compiled("gelu_backward", dout, x)
    if kernel is not None:
        return kernel(*_contiguous(dout, x))
    return gelu_backward_ref(dout, x)


# ---------------------------------------------------------------------------------------------
# Batch norm, training mode (Ioffe & Szegedy 2015, Alg. 1 and its backward). Per channel c, over
# the M = x.size / C values of axes (0, 2, 3, ...); the sums in float64 whatever the dtype, the
# per-element work in x's dtype with the per-channel constants rounded to it (as the C++ kernel).


def _channel(a, x):
    """(C,) per-channel values -> (1, C, 1, 1, ...) so they broadcast over x."""
    return a.reshape((1, -1) + (1,) * (x.ndim - 2))


def _affine(xhat, w, b):
    """xhat w_c + b_c, either of w and b None."""
    y = xhat * _channel(w, xhat) if w is not None else xhat
    return y + _channel(b, xhat) if b is not None else y


def batch_norm_forward_train_ref(x, w, b, eps):
    """x (N, C, ...), w, b (C,) or None -> (out, xhat, mean, var, inv_std), the last three (C,);
    var is the biased variance (divided by M), and out is xhat itself when w and b are None."""
    xp, dtype = _xp(x), x.dtype
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, dtype=np.float64)                          # Alg. 1: mini-batch mean
    var = x.var(axis=axes, dtype=np.float64)                            # Alg. 1: variance (two-pass)
    inv_std = (1 / xp.sqrt(var + eps)).astype(dtype)
    mean, var = mean.astype(dtype), var.astype(dtype)
    xhat = (x - _channel(mean, x)) * _channel(inv_std, x)               # Alg. 1: normalize
    if w is None and b is None:
        return xhat, xhat, mean, var, inv_std
    out = xhat * _channel(w, x) if w is not None else xhat              # Alg. 1: scale and shift
    out = out + _channel(b, x) if b is not None else out
    return out, xhat, mean, var, inv_std


def batch_norm_backward_train_ref(dout, xhat, inv_std, w):
    """dout, xhat (N, C, ...), inv_std, w (C,) or None -> (dx, dw, db), dw and db (C,).
    With dxhat = dout w_c, the backward of xhat = (x - mean) inv_std through mean and var is
    dx = inv_std (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) = inv_std w_c (dout - db/M - xhat dw/M)."""
    dtype = dout.dtype
    axes = (0,) + tuple(range(2, dout.ndim))
    count = dout.size // dout.shape[1]                                  # M
    db = dout.sum(axis=axes, dtype=np.float64)
    dw = (dout * xhat).sum(axis=axes, dtype=np.float64)
    k = inv_std * w if w is not None else inv_std
    mean_d, mean_dh = (db / count).astype(dtype), (dw / count).astype(dtype)
    dx = _channel(k, dout) * (dout - _channel(mean_d, dout) - xhat * _channel(mean_dh, dout))
    return dx, dw.astype(dtype), db.astype(dtype)


def batch_norm_forward_train(x, w, b, eps):
    """-> (out, xhat, mean, var, inv_std); see batch_norm_forward_train_ref."""
    kernel = _compiled("batch_norm_forward_train", x, w, b)
    if kernel is not None and x.ndim >= 2:
        return kernel(*_contiguous(x, w, b), float(eps))
    return batch_norm_forward_train_ref(x, w, b, eps)


def batch_norm_backward_train(dout, xhat, inv_std, w):
    """-> (dx, dw, db); see batch_norm_backward_train_ref."""
    kernel = _compiled("batch_norm_backward_train", dout, xhat, inv_std, w)
    if kernel is not None and dout.ndim >= 2:
        return kernel(*_contiguous(dout, xhat, inv_std, w))
    return batch_norm_backward_train_ref(dout, xhat, inv_std, w)


# Batch norm followed by GELU (the ContextUnet's BatchNorm2d -> GELU), fused in one kernel on the CPU:
# out = gelu(y), y = xhat w + b; the backward recomputes y from xhat, so y is never stored.

def batch_norm_gelu_forward_train_ref(x, w, b, eps):
    """-> (gelu(out), xhat, mean, var, inv_std), with out, ... those of batch_norm_forward_train_ref."""
    out, xhat, mean, var, inv_std = batch_norm_forward_train_ref(x, w, b, eps)
    return gelu_forward_ref(out), xhat, mean, var, inv_std


def batch_norm_gelu_backward_train_ref(dout, xhat, inv_std, w, b):
    """dout: the gradient of gelu(y), y = xhat w + b -> (dx, dw, db) of the batch norm."""
    return batch_norm_backward_train_ref(gelu_backward_ref(dout, _affine(xhat, w, b)), xhat, inv_std, w)


def batch_norm_gelu_forward_train(x, w, b, eps):
    """-> (out, xhat, mean, var, inv_std); see batch_norm_gelu_forward_train_ref."""
    kernel = _compiled("batch_norm_gelu_forward_train", x, w, b)
    if kernel is not None and x.ndim >= 2:
        return kernel(*_contiguous(x, w, b), float(eps))
    return batch_norm_gelu_forward_train_ref(x, w, b, eps)


def batch_norm_gelu_backward_train(dout, xhat, inv_std, w, b):
    """-> (dx, dw, db); see batch_norm_gelu_backward_train_ref."""
    kernel = _compiled("batch_norm_gelu_backward_train", dout, xhat, inv_std, w, b)
    if kernel is not None and dout.ndim >= 2:
        return kernel(*_contiguous(dout, xhat, inv_std, w, b))
    return batch_norm_gelu_backward_train_ref(dout, xhat, inv_std, w, b)


def batch_norm_gelu_forward_eval_ref(x, scale, shift):
    """Eval mode: gelu(x scale_c + shift_c), the running statistics and the affine folded per channel."""
    return gelu_forward_ref(x * _channel(scale, x) + _channel(shift, x))


def batch_norm_gelu_forward_eval(x, scale, shift):
    kernel = _compiled("batch_norm_gelu_forward_eval", x, scale, shift)
    if kernel is not None and x.ndim >= 2:
        return kernel(*_contiguous(x, scale, shift))
    return batch_norm_gelu_forward_eval_ref(x, scale, shift)


# ---------------------------------------------------------------------------------------------
# Group norm (Wu & He 2018, arXiv:1803.08494), then SiLU (the UNet's GroupNorm -> SiLU), in one
# kernel on the CPU (csrc/group_norm_cpu.cpp); silu=False is group norm alone. Per sample n and
# group g of K = C / G channels, over its M = K * H * W ... values; sums in float64, per-element
# work in x's dtype with the per-group constants rounded to it (as the C++ kernel). The cache is
# x itself with mean and inv_std (N, G): the backward recomputes xhat and y.


def _groups(a, num_groups):
    """(N, C, ...) -> the (N, G, K * S) view whose rows are the groups."""
    return a.reshape(a.shape[0], num_groups, -1)


def _xhat(x, mean, inv_std, num_groups):
    """xhat = (x - mean_ng) inv_std_ng, back in x's shape."""
    return ((_groups(x, num_groups) - mean[..., None]) * inv_std[..., None]).reshape(x.shape)


def sigmoid_ref(y):
    """sigmoid(y) = 1 / (1 + exp(-y)), written (1 + tanh(y/2)) / 2, which overflows for no y."""
    return 0.5 * (_xp(y).tanh(0.5 * y) + 1)


def group_norm_silu_forward_ref(x, num_groups, w, b, eps, silu=True):
    """x (N, C, ...), w, b (C,) or None -> (out, mean, inv_std), the last two (N, G):
    mean, var (biased) over each group, xhat = (x - mean) inv_std, inv_std = 1 / sqrt(var + eps),
    y = xhat w_c + b_c (Wu & He eq. 1-3), out = silu(y) = y sigmoid(y), or y itself if not silu."""
    xp, dtype = _xp(x), x.dtype
    xg = _groups(x, num_groups)                                          # (N, G, K * S)
    mean = xg.mean(axis=2, dtype=np.float64)
    inv_std = (1 / xp.sqrt(xg.var(axis=2, dtype=np.float64) + eps)).astype(dtype)   # two-pass variance
    mean = mean.astype(dtype)
    y = _affine(_xhat(x, mean, inv_std, num_groups), w, b)
    return (y * sigmoid_ref(y) if silu else y), mean, inv_std


def group_norm_silu_backward_ref(dout, x, mean, inv_std, num_groups, w, b, silu=True):
    """dout: the gradient of out -> (dx, dw, db). With dy = dout silu'(y), silu'(y) = s (1 + y (1 - s)),
    and dxhat = dy w_c, batch norm's backward within each group (Ioffe & Szegedy Alg. 1):
    dx = inv_std (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), the means over the group."""
    dtype = dout.dtype
    axes = (0,) + tuple(range(2, dout.ndim))
    xhat = _xhat(x, mean, inv_std, num_groups)
    dy = dout
    if silu:
        y = _affine(xhat, w, b)
        s = sigmoid_ref(y)
        dy = dout * (s * (1 + y * (1 - s)))
    db = dy.sum(axis=axes, dtype=np.float64)
    dw = (dy * xhat).sum(axis=axes, dtype=np.float64)
    dxhat = dy * _channel(w, dy) if w is not None else dy
    mean_d = _groups(dxhat, num_groups).mean(axis=2, dtype=np.float64).astype(dtype)[..., None]   # (N, G, 1)
    mean_dh = _groups(dxhat * xhat, num_groups).mean(axis=2, dtype=np.float64).astype(dtype)[..., None]
    dx = inv_std[..., None] * (_groups(dxhat, num_groups) - mean_d - _groups(xhat, num_groups) * mean_dh)
    return dx.reshape(dout.shape), dw.astype(dtype), db.astype(dtype)


def group_norm_silu_forward(x, num_groups, w, b, eps, silu=True):
    """-> (out, mean, inv_std); see group_norm_silu_forward_ref."""
    kernel = _compiled("group_norm_silu_forward", x, w, b)
    if kernel is not None and x.ndim >= 2:
        x, w, b = _contiguous(x, w, b)
        return kernel(x, num_groups, w, b, float(eps), bool(silu))
    return group_norm_silu_forward_ref(x, num_groups, w, b, eps, silu)


def group_norm_silu_backward(dout, x, mean, inv_std, num_groups, w, b, silu=True):
    """-> (dx, dw, db); see group_norm_silu_backward_ref."""
    kernel = _compiled("group_norm_silu_backward", dout, x, mean, inv_std, w, b)
    if kernel is not None and dout.ndim >= 2:
        dout, x, mean, inv_std, w, b = _contiguous(dout, x, mean, inv_std, w, b)
        return kernel(dout, x, mean, inv_std, num_groups, w, b, bool(silu))
    return group_norm_silu_backward_ref(dout, x, mean, inv_std, num_groups, w, b, silu)


# ---------------------------------------------------------------------------------------------
# Adam / AdamW over a list of parameters (Kingma & Ba 2015, Alg. 1; Loshchilov & Hutter 2019,
# Alg. 2), as torch.optim.Adam / AdamW. The scalars are Python floats (float64); NumPy rounds each
# to the arrays' dtype, and the C++ kernel does the same, in the same order, so the two agree.


def adam_step_ref(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
                  decoupled, step):
    """One step t = `step` (>= 1) -> (params, exp_avgs, exp_avg_sqs), three new lists of arrays;
    the arrays given are not changed. decoupled: AdamW's decay, else Adam's L2 term."""
    step_size = lr / (1 - beta1 ** step)                       # bias corrections, in float64
    sqrt_bc2 = math.sqrt(1 - beta2 ** step)
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if weight_decay != 0:
            if decoupled:
                p = p * (1 - lr * weight_decay)                # AdamW Alg. 2, line 12
            else:
                g = g + weight_decay * p                       # Adam: L2 penalty in the gradient
        m = beta1 * m + (1 - beta1) * g                        # Alg. 1: m_t, the first moment
        v = beta2 * v + (1 - beta2) * (g * g)                  # Alg. 1: v_t, the second moment
        denom = _xp(v).sqrt(v) / sqrt_bc2 + eps                # sqrt(v_hat) + eps, v_hat = v / (1 - b2^t)
        new_p.append(p - step_size * (m / denom))              # Alg. 1: theta_t
        new_m.append(m)
        new_v.append(v)
    return new_p, new_m, new_v


def _own(a):
    """a itself if the kernel may write it in place (C-contiguous, writable), else a private copy."""
    return a if a.flags.c_contiguous and a.flags.writeable else np.array(a, order="C")


def adam_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
              decoupled, step):
    """-> (params, exp_avgs, exp_avg_sqs); see adam_step_ref. The C++ kernel updates the arrays
    in place (after copying any it may not write) and returns them; the reference returns new ones."""
    kernel = _compiled("adam_step", *params, *grads, *exp_avgs, *exp_avg_sqs) if params else None
    if kernel is None:
        return adam_step_ref(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps,
                             weight_decay, decoupled, step)
    params, exp_avgs, exp_avg_sqs = ([_own(a) for a in arrays] for arrays in (params, exp_avgs, exp_avg_sqs))
    kernel(params, _contiguous(*grads), exp_avgs, exp_avg_sqs, float(lr), float(beta1), float(beta2),
           float(eps), float(weight_decay), bool(decoupled), int(step))
    return params, exp_avgs, exp_avg_sqs


# ---------------------------------------------------------------------------------------------
# Max pooling (csrc/max_pool_cpu.cpp): each output is the largest value of its kh x kw window of
# x padded with -inf; idx is that value's offset u*kw + v in the window (the first of equal ones,
# and a NaN counts as the largest, as NumPy's argmax). The backward sends dout to that one input.

def max_pool2d_forward_ref(x, kernel_hw, stride, padding):
    """x (N, C, H, W) -> (out, idx), both (N, C, OH, OW); idx int64."""
    xp, (kh, kw), (sh, sw), p = _xp(x), kernel_hw, stride, padding
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, p), conv_output_size(w, kw, sw, p)
    x = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf) if p else x
    out, idx = xp.full((n, c, oh, ow), -np.inf, dtype=x.dtype), xp.zeros((n, c, oh, ow), dtype=np.int64)
    for u in range(kh):
        for v in range(kw):
            tap = x[:, :, u:u + sh * (oh - 1) + 1:sh, v:v + sw * (ow - 1) + 1:sw]   # (N, C, OH, OW)
            better = (tap > out) | (xp.isnan(tap) & ~xp.isnan(out))
            out, idx = xp.where(better, tap, out), xp.where(better, u * kw + v, idx)
    return out, idx


def max_pool2d_backward_ref(dout, idx, input_hw, kernel_hw, stride, padding):
    """dout, idx (N, C, OH, OW) -> dx (N, C, H, W): d max/dx = 1 at the maximum, added up over windows."""
    xp, (kh, kw), (sh, sw), p = _xp(dout), kernel_hw, stride, padding
    n, c, oh, ow = dout.shape
    h, w = input_hw
    dx = xp.zeros((n, c, h + 2 * p, w + 2 * p), dtype=dout.dtype)
    for u in range(kh):
        for v in range(kw):
            dx[:, :, u:u + sh * (oh - 1) + 1:sh, v:v + sw * (ow - 1) + 1:sw] += xp.where(idx == u * kw + v, dout, 0)
    return dx[:, :, p:p + h, p:p + w]


def max_pool2d_forward(x, kernel_hw, stride, padding):
    kernel = _compiled("max_pool2d_forward", x)
    if kernel is not None:
        return kernel(*_contiguous(x), tuple(kernel_hw), tuple(stride), padding)
    return max_pool2d_forward_ref(x, kernel_hw, stride, padding)


def max_pool2d_backward(dout, idx, input_hw, kernel_hw, stride, padding):
    kernel = _compiled("max_pool2d_backward", dout)
    if kernel is not None:
        dout, idx = _contiguous(dout, idx)
        return kernel(dout, idx, tuple(input_hw), tuple(kernel_hw), tuple(stride), padding)
    return max_pool2d_backward_ref(dout, idx, input_hw, kernel_hw, stride, padding)


# ---------------------------------------------------------------------------------------------
# Philox-4x32-10 random numbers (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as
# easy as 1, 2, 3", SC'11, Sec. 4.2; csrc/philox_math.h, philox_cpu.cpp, philox.cu). A 128-bit
# counter c and a 64-bit key k give 128 random bits, ten rounds of
#     (hi0, lo0) = M0 c0,  (hi1, lo1) = M1 c2   (32 x 32 -> 64-bit products)
#     c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0),  the key bumped by (W0, W1) before rounds 2..10.
# The stream of key k: word j (a 128-bit position) is lane j % 4 of block j // 4. A draw of n
# words from position `counter` is words counter .. counter + n - 1, so drawing n then m words is
# drawing n + m. Floats from words x (tinydiff.philox.Philox):
#     uniform [0, 1):  float64 x 2^-32,  float32 (x >> 8) 2^-24                     (exact)
#     normal (Box & Muller 1958), from the pair (x0, x1) at positions 2i, 2i + 1, in float64:
#         u1 = (x0 + 1) 2^-32 in (0, 1],  u2 = x1 2^-32,  r = sqrt(-2 log u1),  theta = 2 pi u2
#         z_2i = r cos theta,  z_2i+1 = r sin theta;  a float32 normal is the float64 one rounded
# The integer and uniform maps are exact, so they agree bit for bit everywhere. log, cos and sin
# are the platform's (NumPy's, libm's, CUDA's): float64 normals agree to a few ulps, and float32
# normals, rounded from them, to one float32 ulp (in practice bit for bit; tests/test_philox.py).

PHILOX_M = (0xD2511F53, 0xCD9E8D57)    # the round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)    # the Weyl key increments
_LOW32 = 0xFFFFFFFF


def philox_block_ref(counter, key, rounds=10):
    """Philox-4x32-R of counters (N, 4) and key (2,), uint32 (any array module) -> (N, 4) uint32."""
    xp = _xp(counter)
    c = [counter[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = int(key[0]), int(key[1])
    for r in range(rounds):
        if r > 0:                                           # the key schedule, a Weyl sequence
            k0, k1 = (k0 + PHILOX_W[0]) & _LOW32, (k1 + PHILOX_W[1]) & _LOW32
        p0, p1 = c[0] * np.uint64(PHILOX_M[0]), c[2] * np.uint64(PHILOX_M[1])   # < 2^64: exact
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & np.uint64(_LOW32),
             (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1), p0 & np.uint64(_LOW32)]
    return xp.stack(c, axis=1).astype(np.uint32)


def _position(counter):
    """The four uint32 words of a stream position, low first, as a Python int."""
    return sum(int(w) << (32 * i) for i, w in enumerate(counter))


def _philox_blocks(key, counter, n, xp):
    """The stream's words counter .. counter + n - 1, as the blocks that hold them: returns
    (words (blocks * 4,) uint32, skip) with the draw at words[skip:skip + n]."""
    start = _position(counter)
    first, skip = start >> 2, start & 3
    blocks = (skip + n + 3) // 4
    j = xp.arange(blocks, dtype=np.uint64)
    lo = xp.uint64(first & (2**64 - 1)) + j                  # block first + j, as 64-bit halves
    hi = xp.uint64(first >> 64) + (lo < xp.uint64(first & (2**64 - 1))).astype(np.uint64)   # the carry
    mask = np.uint64(_LOW32)
    ctr = xp.stack([lo & mask, lo >> np.uint64(32), hi & mask, hi >> np.uint64(32)], axis=1).astype(np.uint32)
    return philox_block_ref(ctr, np.asarray(key, dtype=np.uint32)).reshape(-1), skip


def philox_uint32_ref(key, counter, n, xp=np):
    """key (2,), counter (4,) uint32 -> (n,) uint32: the words counter .. counter + n - 1 of the stream."""
    words, skip = _philox_blocks(key, counter, n, xp)
    return words[skip:skip + n]


def philox_normal_ref(key, counter, n, dtype, xp=np):
    """key (2,), counter (4,) uint32 -> (n,) standard normals in dtype: Box-Muller on word pairs."""
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise TypeError(f"philox_normal: dtype must be float32 or float64, got {np.dtype(dtype)}")
    words, skip = _philox_blocks(key, counter, n, xp)
    x = words.reshape(-1, 2).astype(np.float64)              # (pairs, 2); pairs never straddle a block
    u1 = (x[:, 0] + 1.0) * 2.0**-32                          # (0, 1]: log(u1) is finite
    u2 = x[:, 1] * 2.0**-32                                  # [0, 1)
    r, theta = xp.sqrt(-2.0 * xp.log(u1)), (2 * math.pi) * u2
    z = xp.stack([r * xp.cos(theta), r * xp.sin(theta)], axis=1).reshape(-1)
    return z[skip:skip + n].astype(dtype)


def _philox_kernel(name, xp):
    """The compiled Philox kernel for xp's device, or None: then the reference runs."""
    if backend.get_kernels() != "native":
        return None
    mod = backend.native if xp is np else backend.cuda_kernels()
    return getattr(mod, name, None)


def philox_uint32(key, counter, n, xp=np):
    """philox_uint32_ref on xp's device (NumPy: the C++ kernel; CuPy: the CUDA kernel) where built."""
    kernel = _philox_kernel("philox_uint32", xp)
    return kernel(key, counter, n) if kernel is not None else philox_uint32_ref(key, counter, n, xp)


def philox_normal(key, counter, n, dtype, xp=np):
    kernel = _philox_kernel("philox_normal", xp)
    return kernel(key, counter, n, dtype) if kernel is not None else philox_normal_ref(key, counter, n, dtype, xp)
