// harness.cpp: C entry points to the emulated launchers (see emulator.h), for ctypes in
// tests/test_cuda.py. Shapes travel as int arrays; `f` is 0 for float32, 1 for float64; a
// convolution version is its name, as emu_conv2d_version(i) lists the table of conv2d.cu.
#include "emulator.h"
#include "kernels_cuda.h"

namespace {

Conv2dShape conv_shape(const int* v) {   // N, C, H, W, O, kh, kw, OH, OW, stride, padding
    return Conv2dShape{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10]};
}

template <typename T>
void forward(void* out, const void* x, const void* w, const void* b, const Conv2dShape& s, const char* version, int sms) {
    std::vector<T> workspace(conv2d_forward_workspace(s, version, sms));
    conv2d_forward_cuda<T>((T*)out, (const T*)x, (const T*)w, (const T*)b, s, version, workspace.data(), sms, nullptr);
}

template <typename T>
void backward_weight(void* dw, const void* dout, const void* x, const Conv2dShape& s, const char* version, int sms) {
    std::vector<T> workspace(conv2d_backward_weight_workspace(s, version, sms));
    conv2d_backward_weight_cuda<T>((T*)dw, (const T*)dout, (const T*)x, s, version, workspace.data(), sms, nullptr);
}

}  // namespace

extern "C" {

int emu_conv2d_num_versions() { return (int)conv2d_versions_cuda().size(); }

const char* emu_conv2d_version(int i) {
    static std::vector<std::string> names = conv2d_versions_cuda();
    return names[i].c_str();
}

long long emu_backward_weight_workspace(const int* shape, const char* version, int sms) {
    return conv2d_backward_weight_workspace(conv_shape(shape), version, sms);
}

long long emu_forward_workspace(const int* shape, const char* version, int sms) {
    return conv2d_forward_workspace(conv_shape(shape), version, sms);
}

void emu_conv2d_forward(int f, void* out, const void* x, const void* w, const void* b, const int* shape, const char* version, int sms) {
    if (f == 0) forward<float>(out, x, w, b, conv_shape(shape), version, sms);
    else forward<double>(out, x, w, b, conv_shape(shape), version, sms);
}

void emu_conv2d_backward_input(int f, void* dx, const void* dout, const void* w, const int* shape, const char* version) {
    if (f == 0) conv2d_backward_input_cuda<float>((float*)dx, (const float*)dout, (const float*)w, conv_shape(shape), version, nullptr);
    else conv2d_backward_input_cuda<double>((double*)dx, (const double*)dout, (const double*)w, conv_shape(shape), version, nullptr);
}

void emu_conv2d_backward_weight(int f, void* dw, const void* dout, const void* x, const int* shape, const char* version, int sms) {
    if (f == 0) backward_weight<float>(dw, dout, x, conv_shape(shape), version, sms);
    else backward_weight<double>(dw, dout, x, conv_shape(shape), version, sms);
}

// coefs: sqrt_alpha_bar, sqrt_one_minus_alpha_bar
void emu_q_sample(int f, void* xt, const void* x0, const void* eps, const void* const* coefs, int B, int per_sample) {
    if (f == 0) q_sample_cuda<float>((float*)xt, (const float*)x0, (const float*)eps, (const float*)coefs[0], (const float*)coefs[1], B, per_sample, nullptr);
    else q_sample_cuda<double>((double*)xt, (const double*)x0, (const double*)eps, (const double*)coefs[0], (const double*)coefs[1], B, per_sample, nullptr);
}

// coefs: coef_x, coef_eps, sigma
void emu_ddpm_step(int f, void* x_prev, const void* xt, const void* eps, const void* eps_uncond, const void* z,
                   const void* const* coefs, double scale, int B, int per_sample) {
    if (f == 0) ddpm_step_cuda<float>((float*)x_prev, (const float*)xt, (const float*)eps, (const float*)eps_uncond, (const float*)z,
                                      (const float*)coefs[0], (const float*)coefs[1], (const float*)coefs[2], (float)scale, B, per_sample, nullptr);
    else ddpm_step_cuda<double>((double*)x_prev, (const double*)xt, (const double*)eps, (const double*)eps_uncond, (const double*)z,
                                (const double*)coefs[0], (const double*)coefs[1], (const double*)coefs[2], scale, B, per_sample, nullptr);
}

// coefs: sqrt_alpha_bar, sqrt_one_minus_alpha_bar, sqrt_alpha_bar_prev, dir_coef, sigma
void emu_ddim_step(int f, void* x_prev, void* x0, const void* xt, const void* eps, const void* eps_uncond, const void* z,
                   const void* const* coefs, int clip, double scale, int B, int per_sample) {
    if (f == 0) ddim_step_cuda<float>((float*)x_prev, (float*)x0, (const float*)xt, (const float*)eps, (const float*)eps_uncond,
                                      (const float*)z, (const float*)coefs[0], (const float*)coefs[1], (const float*)coefs[2],
                                      (const float*)coefs[3], (const float*)coefs[4], clip != 0, (float)scale, B, per_sample, nullptr);
    else ddim_step_cuda<double>((double*)x_prev, (double*)x0, (const double*)xt, (const double*)eps, (const double*)eps_uncond,
                                (const double*)z, (const double*)coefs[0], (const double*)coefs[1], (const double*)coefs[2],
                                (const double*)coefs[3], (const double*)coefs[4], clip != 0, scale, B, per_sample, nullptr);
}

void emu_gelu_forward(int f, void* out, const void* x, long long n) {
    if (f == 0) gelu_forward_cuda<float>((float*)out, (const float*)x, n, nullptr);
    else gelu_forward_cuda<double>((double*)out, (const double*)x, n, nullptr);
}

void emu_gelu_backward(int f, void* dx, const void* dout, const void* x, long long n) {
    if (f == 0) gelu_backward_cuda<float>((float*)dx, (const float*)dout, (const float*)x, n, nullptr);
    else gelu_backward_cuda<double>((double*)dx, (const double*)dout, (const double*)x, n, nullptr);
}

// key (2,), counter (4,): the Philox generator's state
void emu_philox_uint32(void* out, const uint32_t* key, const uint32_t* counter, long long n) {
    philox_uint32_cuda((uint32_t*)out, key, counter, n, nullptr);
}

void emu_philox_normal(int f, void* out, const uint32_t* key, const uint32_t* counter, long long n) {
    if (f == 0) philox_normal_cuda<float>((float*)out, key, counter, n, nullptr);
    else philox_normal_cuda<double>((double*)out, key, counter, n, nullptr);
}

}  // extern "C"
