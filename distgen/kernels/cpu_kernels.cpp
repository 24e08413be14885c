// distgen's CPU kernels: plain C++ loops written so that the compiler vectorizes them for the CPU it
// is built on (-O3 -march=native), parallel with OpenMP (the runtime torch already loaded), and
// exported with a C ABI so that Python calls them through ctypes on tensors' data pointers.
//
// Each kernel matches the rounding of its plain-torch reference in distgen/layers: arithmetic in
// float32, with the result rounded to the tensor's dtype where the reference rounds it.
// Two storage types: float (fp32) and uint16_t holding bfloat16 bits (bf16).

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = uint16_t;

inline float to_f(float x) { return x; }
inline float to_f(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline T from_f(float f);
template <>
inline float from_f<float>(float f) {
  return f;
}
template <>
inline bf16 from_f<bf16>(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16>(u >> 16);
}

// Rounds a float32 value the way a tensor of type T would store it.
template <typename T>
inline float round_to(float f) {
  return to_f(from_f<T>(f));
}

// exp(x) to about one ulp over the range softmax and SiLU need, branch-free so loops vectorize
// (glibc's vector expf is only reachable with -ffast-math, which would also loosen everything else).
inline float exp_f(float x) {
  x = std::fmin(std::fmax(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = std::fma(n, -0.693145751953125f, x);
  r = std::fma(n, -1.428606765330187e-06f, r);
  float p = 1.0f / 5040.0f;
  p = std::fma(p, r, 1.0f / 720.0f);
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// Threads only when the work pays for waking them.
inline bool worth_threads(int64_t elems) { return elems >= (1 << 14) && omp_get_max_threads() > 1; }

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

template <typename T>
void rms_norm(T* out, const T* x, const T* w, int64_t rows, int64_t h, float eps) {
#pragma omp parallel for if (worth_threads(rows * h))
  for (int64_t t = 0; t < rows; ++t) norm_row(out + t * h, x + t * h, w, h, eps);
}

// residual <- x + residual (rounded to T); x <- norm(residual). Both in place.
template <typename T>
void add_rms_norm(T* x, T* residual, const T* w, int64_t rows, int64_t h, float eps) {
#pragma omp parallel for if (worth_threads(rows * h))
  for (int64_t t = 0; t < rows; ++t) {
    T* xr = x + t * h;
    T* rr = residual + t * h;
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
// into the cache slots. q_norm / k_norm (Qwen3) are applied to each head first when not null.
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
      const int64_t slot = ((a.slot_block[t] * a.num_kv_heads + h) * a.block_size + a.slot_offset[t]) * d;
      std::memcpy(k_cache + slot, kt + h * d, d * sizeof(T));
      std::memcpy(v_cache + slot, vt + h * d, d * sizeof(T));
    }
  }
}

// ---- Paged attention over the cache, in place through the block table -----------------------------
//
// One call serves a whole step: decode rows (one query each) and prefill chunks (many), each row's
// queries being the last ones of its context (query i of n attends keys [0, ctx - n + i]).
// A work item is (sequence, KV head, tile of up to kQueryTile queries); its rows are every query of
// the tile times the query heads that share the KV head (GQA), so each key is read once per item.
// Keys are visited kKeyTile at a time with an online softmax. Items with one query (decode) score
// keys with dot products straight from the cache; longer tiles first copy the key tile transposed,
// which turns scoring into broadcast FMAs over kKeyTile lanes.

constexpr int64_t kQueryTile = 16;
constexpr int64_t kKeyTile = 16;

struct AttnArgs {
  int64_t num_seqs, num_heads, num_kv_heads, head_dim, block_size;
  int64_t q_stride;            // elements between consecutive query tokens
  int64_t block_table_stride;  // elements between rows of the block table
  const int32_t* block_tables;
  const int32_t* seq_lens;     // [B] context length, this step's tokens included
  const int32_t* query_start;  // [B + 1] offsets of each row's queries
  float scale;
};

struct Item {
  int64_t seq, kv_head, q0, q1;
};

// Per-thread scratch, sized once per call.
struct Scratch {
  std::vector<float> q, acc, m, l, s, kt, v;
  Scratch(int64_t rows, int64_t d)
      : q(rows * d), acc(rows * d), m(rows), l(rows), s(rows * kKeyTile), kt(d * kKeyTile), v(kKeyTile * d) {}
};

template <typename T>
inline const T* key_row(const T* cache, const AttnArgs& a, const int32_t* table, int64_t kv_head, int64_t j) {
  const int64_t block = table[j / a.block_size];
  return cache + ((block * a.num_kv_heads + kv_head) * a.block_size + j % a.block_size) * a.head_dim;
}

// Online-softmax update of rows [0, rows) with scores s[r][0, nk) (already masked to -inf), then
// acc[r] += p[r] . V; v_row(t) gives key t's value vector.
template <typename T, typename VRow>
inline void softmax_accumulate(Scratch& w, int64_t rows, int64_t nk, int64_t d, VRow v_row) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = &w.s[r * kKeyTile];
    float mx = w.m[r];
    for (int64_t t = 0; t < nk; ++t) mx = std::fmax(mx, s[t]);
    if (mx == -INFINITY) continue;  // every key of this tile is masked for this row
    const float corr = exp_f(w.m[r] - mx);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < nk; ++t) {
      s[t] = s[t] == -INFINITY ? 0.0f : exp_f(s[t] - mx);
      sum += s[t];
    }
    w.l[r] = w.l[r] * corr + sum;
    w.m[r] = mx;
    float* acc = &w.acc[r * d];
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) acc[i] *= corr;
    for (int64_t t = 0; t < nk; ++t) {
      if (s[t] == 0.0f) continue;
      const float p = s[t];
      const T* vr = v_row(t);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) acc[i] = std::fma(p, to_f(vr[i]), acc[i]);
    }
  }
}

template <typename T>
void attend_item(const AttnArgs& a, const Item& it, const T* q, const T* k_cache, const T* v_cache, T* out,
                 Scratch& w) {
  const int64_t d = a.head_dim, group = a.num_heads / a.num_kv_heads;
  const int64_t q_begin = a.query_start[it.seq], nq = a.query_start[it.seq + 1] - q_begin;
  const int64_t ctx = a.seq_lens[it.seq];
  const int32_t* table = a.block_tables + it.seq * a.block_table_stride;
  const int64_t rows = (it.q1 - it.q0) * group;
  // Row r = (query qi, head g): its last visible key is ctx - nq + qi.
  for (int64_t qi = it.q0; qi < it.q1; ++qi)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = (qi - it.q0) * group + g;
      const T* src = q + (q_begin + qi) * a.q_stride + (it.kv_head * group + g) * d;
      for (int64_t i = 0; i < d; ++i) w.q[r * d + i] = to_f(src[i]) * a.scale;
      w.m[r] = -INFINITY;
      w.l[r] = 0.0f;
    }
  std::fill(w.acc.begin(), w.acc.begin() + rows * d, 0.0f);
  const int64_t first_limit = ctx - nq + it.q0;   // last key the tile's first query sees
  const int64_t num_keys = ctx - nq + it.q1;      // keys the tile's last query sees
  const bool tiled = it.q1 - it.q0 > 1;
  for (int64_t j0 = 0; j0 < num_keys; j0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, num_keys - j0);
    if (tiled) {
      for (int64_t t = 0; t < nk; ++t) {
        const T* kr = key_row(k_cache, a, table, it.kv_head, j0 + t);
        const T* vr = key_row(v_cache, a, table, it.kv_head, j0 + t);
        for (int64_t i = 0; i < d; ++i) {
          w.kt[i * kKeyTile + t] = to_f(kr[i]);
          w.v[t * d + i] = to_f(vr[i]);
        }
      }
      for (int64_t t = nk; t < kKeyTile; ++t)
        for (int64_t i = 0; i < d; ++i) w.kt[i * kKeyTile + t] = 0.0f;
      for (int64_t r = 0; r < rows; ++r) {
        float sc[kKeyTile] = {};
        const float* qr = &w.q[r * d];
        for (int64_t i = 0; i < d; ++i) {
          const float qv = qr[i];
          const float* kc = &w.kt[i * kKeyTile];
#pragma omp simd
          for (int64_t t = 0; t < kKeyTile; ++t) sc[t] = std::fma(qv, kc[t], sc[t]);
        }
        std::memcpy(&w.s[r * kKeyTile], sc, sizeof(sc));
      }
    } else {
      for (int64_t t = 0; t < nk; ++t) {
        const T* kr = key_row(k_cache, a, table, it.kv_head, j0 + t);
        for (int64_t r = 0; r < rows; ++r) {
          const float* qr = &w.q[r * d];
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < d; ++i) acc += qr[i] * to_f(kr[i]);
          w.s[r * kKeyTile + t] = acc;
        }
      }
    }
    if (j0 + nk - 1 > first_limit) {  // causal mask inside the tile
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t limit = first_limit + r / group;
        for (int64_t t = 0; t < nk; ++t)
          if (j0 + t > limit) w.s[r * kKeyTile + t] = -INFINITY;
      }
    }
    if (tiled) {
      const float* vbuf = w.v.data();
      softmax_accumulate<float>(w, rows, nk, d, [&](int64_t t) { return vbuf + t * d; });
    } else {
      softmax_accumulate<T>(w, rows, nk, d,
                            [&](int64_t t) { return key_row(v_cache, a, table, it.kv_head, j0 + t); });
    }
  }
  for (int64_t qi = it.q0; qi < it.q1; ++qi)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = (qi - it.q0) * group + g;
      T* dst = out + ((q_begin + qi) * a.num_heads + it.kv_head * group + g) * d;
      const float inv = 1.0f / w.l[r];
      for (int64_t i = 0; i < d; ++i) dst[i] = from_f<T>(w.acc[r * d + i] * inv);
    }
}

template <typename T>
void paged_attention(const AttnArgs& a, const T* q, const T* k_cache, const T* v_cache, T* out) {
  std::vector<Item> items;
  for (int64_t b = 0; b < a.num_seqs; ++b) {
    const int64_t nq = a.query_start[b + 1] - a.query_start[b];
    for (int64_t q0 = 0; q0 < nq; q0 += kQueryTile)
      for (int64_t h = 0; h < a.num_kv_heads; ++h) items.push_back({b, h, q0, std::min(nq, q0 + kQueryTile)});
  }
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t rows = kQueryTile * (a.num_heads / a.num_kv_heads);
#pragma omp parallel if (n > 1)
  {
    Scratch w(rows, a.head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) attend_item(a, items[i], q, k_cache, v_cache, out, w);
  }
}

}  // namespace

// ---- C ABI ------------------------------------------------------------------------------------------
// Suffix _f32 / _bf16 names the storage type; pointers are to contiguous data unless a stride says not.

#define DG_EXPORT extern "C" __attribute__((visibility("default")))

#define DG_BOTH(MACRO) MACRO(f32, float) MACRO(bf16, bf16)

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

#define DG_ATTN(SUF, T)                                                                                 \
  DG_EXPORT void dg_paged_attention_##SUF(                                                              \
      void* out, const void* q, const void* k_cache, const void* v_cache, const int32_t* block_tables,  \
      const int32_t* seq_lens, const int32_t* query_start, int64_t num_seqs, int64_t num_heads,         \
      int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t q_stride,                     \
      int64_t block_table_stride, float scale) {                                                        \
    AttnArgs a{num_seqs, num_heads,    num_kv_heads, head_dim,    block_size, q_stride,                 \
               block_table_stride, block_tables, seq_lens, query_start, scale};                         \
    paged_attention(a, static_cast<const T*>(q), static_cast<const T*>(k_cache),                        \
                    static_cast<const T*>(v_cache), static_cast<T*>(out));                              \
  }
DG_BOTH(DG_ATTN)
