// Elementwise kernels: RMSNorm (with the residual add fused in), SiLU-and-mul, rotary fused with the
// KV-cache store, and the greedy sampler's row argmax.
#include "common.h"

namespace {

using namespace dg;

// ---- RMSNorm, optionally with the residual add fused in ----------------------------------------

// One row: out = w * round(x * rsqrt(mean(x^2) + eps)); as distgen.layers.norm.RMSNorm.
template <typename T>
inline void norm_row(T* out, const T* x, const T* w, int64_t h, float eps) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < h; ++i) {
    const float v = to_f(x[i]);
    ss += v * v;
  }
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) out[i] = from_f<T>(to_f(w[i]) * round_to<T>(to_f(x[i]) * r));
}

// norm_row for h a multiple of 16, sixteen lanes at a time with the same roundings. GCC's tuning for some
// Xeons leaves norm_row's bfloat16 conversions scalar: add + norm of a 2048 x 576 bf16 prefill chunk took
// 650 us there, against 400 us for float32's twice the bytes. The square sum runs in sixteen lanes
// added up at the end, another order than norm_row's (both are float32 sums of the same squares).
template <typename T>
inline void norm_row16(T* out, const T* x, const T* w, int64_t h, float eps) {
  vf16 ss = {};
  for (int64_t i = 0; i < h; i += 16) {
    const vf16 v = load16(x + i);
    ss += v * v;
  }
  float sum = 0.0f;
  for (int l = 0; l < 16; ++l) sum += ss[l];
  const vf16 r = splat16(1.0f / std::sqrt(sum / static_cast<float>(h) + eps));
  for (int64_t i = 0; i < h; i += 16)
    store_rounded16(out + i, round16<T>(load16(w + i) * round16<T>(load16(x + i) * r)));
}

template <typename T>
void rms_norm(T* out, const T* x, const T* w, int64_t rows, int64_t h, float eps) {
#pragma omp parallel for if (worth_threads(rows * h))
  for (int64_t t = 0; t < rows; ++t) {
    if (h % 16 == 0)
      norm_row16(out + t * h, x + t * h, w, h, eps);
    else
      norm_row(out + t * h, x + t * h, w, h, eps);
  }
}

// residual <- x + residual (rounded to T); x <- norm(residual). Both in place.
template <typename T>
void add_rms_norm(T* x, T* residual, const T* w, int64_t rows, int64_t h, float eps) {
#pragma omp parallel for if (worth_threads(rows * h))
  for (int64_t t = 0; t < rows; ++t) {
    T* xr = x + t * h;
    T* rr = residual + t * h;
    if (h % 16 == 0) {
      for (int64_t i = 0; i < h; i += 16) store_rounded16(rr + i, round16<T>(load16(xr + i) + load16(rr + i)));
      norm_row16(xr, rr, w, h, eps);
      continue;
    }
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) rr[i] = from_f<T>(to_f(xr[i]) + to_f(rr[i]));
    norm_row(xr, rr, w, h, eps);
  }
}

// ---- SiLU and mul --------------------------------------------------------------------------------

// out[t, i] = silu(x[t, i]) * x[t, inter + i], each product rounded as torch's two ops round it.
template <typename T>
void silu_and_mul(T* out, const T* x, int64_t rows, int64_t inter) {
#pragma omp parallel for if (worth_threads(rows * inter))
  for (int64_t t = 0; t < rows; ++t) {
    const T* g = x + t * 2 * inter;
    const T* u = g + inter;
    T* o = out + t * inter;
#pragma omp simd
    for (int64_t i = 0; i < inter; ++i) {
      const float a = to_f(g[i]);
      const float s = round_to<T>(a / (1.0f + exp_f(-a)));
      o[i] = from_f<T>(s * to_f(u[i]));
    }
  }
}

// ---- Rotary embedding (NeoX layout), optional per-head q/k RMSNorm, and the KV-cache store --------

struct RotaryArgs {
  int64_t num_tokens, num_heads, num_kv_heads, head_dim, block_size;
  int64_t q_stride, k_stride, v_stride;  // elements between consecutive tokens
  const int64_t* positions;              // [T]; null: no rotary (the store alone)
  const float* cos;                      // [max_position, head_dim / 2]
  const float* sin;
  const int64_t* slot_block;  // [T]
  const int64_t* slot_offset;
  float eps;  // for the q/k norms
};

template <typename T>
inline void rotate_head(T* x, const float* c, const float* s, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = to_f(x[i]), b = to_f(x[i + half]);
    x[i] = from_f<T>(a * c[i] - b * s[i]);
    x[i + half] = from_f<T>(b * c[i] + a * s[i]);
  }
}

// q and k are rotated in place (q stays where the QKV projection wrote it); k and v are then copied
// into the cache slots (K transposed within its block: see the attention below). q_norm / k_norm (Qwen3) are applied to each head first when not null.
template <typename T>
void rotary_store_kv(const RotaryArgs& a, T* q, T* k, const T* v, T* k_cache, T* v_cache, const T* q_norm,
                     const T* k_norm) {
  const int64_t d = a.head_dim, half = d / 2;
#pragma omp parallel for if (worth_threads(a.num_tokens * (a.num_heads + a.num_kv_heads) * d))
  for (int64_t t = 0; t < a.num_tokens; ++t) {
    T* qt = q + t * a.q_stride;
    T* kt = k + t * a.k_stride;
    const T* vt = v + t * a.v_stride;
    if (a.positions != nullptr) {
      const float* c = a.cos + a.positions[t] * half;
      const float* s = a.sin + a.positions[t] * half;
      for (int64_t h = 0; h < a.num_heads; ++h) {
        if (q_norm != nullptr) norm_row(qt + h * d, qt + h * d, q_norm, d, a.eps);
        rotate_head(qt + h * d, c, s, half);
      }
      for (int64_t h = 0; h < a.num_kv_heads; ++h) {
        if (k_norm != nullptr) norm_row(kt + h * d, kt + h * d, k_norm, d, a.eps);
        rotate_head(kt + h * d, c, s, half);
      }
    }
    for (int64_t h = 0; h < a.num_kv_heads; ++h) {
      const int64_t block = (a.slot_block[t] * a.num_kv_heads + h) * a.block_size * d;
      T* kdst = k_cache + block + a.slot_offset[t];  // K blocks are [d, bs]: one column per token
      for (int64_t i = 0; i < d; ++i) kdst[i * a.block_size] = kt[h * d + i];
      std::memcpy(v_cache + block + a.slot_offset[t] * d, vt + h * d, d * sizeof(T));
    }
  }
}

// ---- Greedy sampling: the index of each row's largest value ---------------------------------------

// torch.argmax's answer: the first index of the maximum, where a NaN counts as the maximum. Sixteen
// lanes each keep their own first maximum (strictly greater replaces), so the loop vectorizes; the
// answer is then the lowest index among the lanes holding the overall maximum.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  constexpr int kL = 16;
  int64_t i = 0;
  float best[kL];
  int32_t idx[kL];
  bool nan = false;
  if (n >= kL) {
    for (int l = 0; l < kL; ++l) {
      best[l] = to_f(x[l]);
      idx[l] = l;
      nan = nan || best[l] != best[l];
    }
    for (i = kL; i + kL <= n; i += kL) {
#pragma omp simd reduction(|| : nan)
      for (int l = 0; l < kL; ++l) {
        const float v = to_f(x[i + l]);
        const bool gt = v > best[l];
        best[l] = gt ? v : best[l];
        idx[l] = gt ? static_cast<int32_t>(i + l) : idx[l];
        nan = nan || v != v;
      }
    }
  }
  int64_t arg = 0;
  float mx = n > 0 ? to_f(x[0]) : 0.0f;
  if (n >= kL) {
    arg = idx[0], mx = best[0];
    for (int l = 1; l < kL; ++l)
      if (best[l] > mx || (best[l] == mx && idx[l] < arg)) arg = idx[l], mx = best[l];
  }
  for (; i < n; ++i) {
    const float v = to_f(x[i]);
    nan = nan || v != v;
    if (v > mx) arg = i, mx = v;
  }
  if (nan)
    for (int64_t j = 0; j < n; ++j)
      if (to_f(x[j]) != to_f(x[j])) return j;
  return arg;
}

template <typename T>
void argmax_rows(int64_t* out, const T* x, int64_t rows, int64_t n) {
#pragma omp parallel for if (worth_threads(rows * n))
  for (int64_t r = 0; r < rows; ++r) out[r] = argmax_row(x + r * n, n);
}

}  // namespace

// ---- C ABI ----------------------------------------------------------------------------------------

#define DG_NORM(SUF, T)                                                                                 \
  DG_EXPORT void dg_rms_norm_##SUF(void* out, const void* x, const void* w, int64_t rows, int64_t h,    \
                                    float eps) {                                                        \
    rms_norm(static_cast<T*>(out), static_cast<const T*>(x), static_cast<const T*>(w), rows, h, eps);  \
  }                                                                                                     \
  DG_EXPORT void dg_add_rms_norm_##SUF(void* x, void* residual, const void* w, int64_t rows, int64_t h, \
                                        float eps) {                                                    \
    add_rms_norm(static_cast<T*>(x), static_cast<T*>(residual), static_cast<const T*>(w), rows, h, eps); \
  }                                                                                                     \
  DG_EXPORT void dg_silu_and_mul_##SUF(void* out, const void* x, int64_t rows, int64_t inter) {         \
    silu_and_mul(static_cast<T*>(out), static_cast<const T*>(x), rows, inter);                          \
  }
DG_BOTH(DG_NORM)

#define DG_ROTARY(SUF, T)                                                                               \
  DG_EXPORT void dg_rotary_store_kv_##SUF(                                                              \
      void* q, void* k, const void* v, void* k_cache, void* v_cache, const void* q_norm,                \
      const void* k_norm, const int64_t* positions, const float* cos, const float* sin,                 \
      const int64_t* slot_block, const int64_t* slot_offset, int64_t num_tokens, int64_t num_heads,     \
      int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t q_stride, int64_t k_stride,   \
      int64_t v_stride, float eps) {                                                                    \
    RotaryArgs a{num_tokens, num_heads, num_kv_heads, head_dim, block_size, q_stride, k_stride,         \
                 v_stride,   positions, cos,          sin,      slot_block, slot_offset, eps};          \
    rotary_store_kv(a, static_cast<T*>(q), static_cast<T*>(k), static_cast<const T*>(v),                \
                    static_cast<T*>(k_cache), static_cast<T*>(v_cache), static_cast<const T*>(q_norm), \
                    static_cast<const T*>(k_norm));                                                     \
  }
DG_BOTH(DG_ROTARY)

#define DG_ARGMAX(SUF, T)                                                                               \
  DG_EXPORT void dg_argmax_rows_##SUF(int64_t* out, const void* x, int64_t rows, int64_t n) {           \
    argmax_rows(out, static_cast<const T*>(x), rows, n);                                                \
  }
DG_BOTH(DG_ARGMAX)
