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

// max/min as plain selects: std::fmax/fmin keep NaN rules that make GCC call libm for each element.
inline float max_f(float a, float b) { return a > b ? a : b; }
inline float min_f(float a, float b) { return a < b ? a : b; }

// exp(x) to about one ulp over the range softmax and SiLU need, branch-free so loops vectorize
// (glibc's vector expf is only reachable with -ffast-math, which would also loosen everything else).
inline float exp_f(float x) {
  x = min_f(max_f(x, -87.0f), 88.0f);
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

// ---- Paged attention over the cache, in place through the block table -----------------------------
//
// Cache layout on this path: V blocks are [Hkv, bs, D] as everywhere, but each K block is stored
// transposed, [Hkv, D, bs], so that scoring a query against a block's keys is D broadcast FMAs over
// bs contiguous lanes: no horizontal sums (which, kept in order without -ffast-math, cost more than
// the products) and no copy. The store above writes K that way.
//
// One call serves a whole step: decode rows (one query each) and prefill chunks (many), each row's
// queries being the last ones of its context (query i of n attends keys [0, ctx - n + i]).
// A work item is (sequence, KV head, tile of up to kQueryTile queries); its rows are every query of
// the tile times the query heads that share the KV head (GQA), so each key is read once per item.
// Keys are visited a block at a time with an online softmax.

constexpr int64_t kQueryTile = 16;

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
  std::vector<float> q, acc, m, l, s;
  Scratch(int64_t rows, int64_t d, int64_t bs) : q(rows * d), acc(rows * d), m(rows), l(rows), s(rows * bs) {}
};

// s[r][t] = q_r . k_t for kRows query rows (q and s rows kStride apart) and the n first keys of a
// transposed K block [d, bs]. Sixteen keys at a time go through fixed-size accumulators, one per row,
// which the compiler keeps in registers: each key vector loaded feeds kRows independent FMA chains.
template <int kRows, typename T>
inline void score_rows(const float* q, int64_t q_stride, const T* kb, int64_t d, int64_t bs, int64_t n,
                       float* s, int64_t s_stride) {
  constexpr int64_t kLanes = 16;
  int64_t t0 = 0;
  for (; t0 + kLanes <= n; t0 += kLanes) {
    float acc[kRows][kLanes] = {};
    for (int64_t i = 0; i < d; ++i) {
      const T* kc = kb + i * bs + t0;
      float kv[kLanes];
#pragma omp simd
      for (int64_t t = 0; t < kLanes; ++t) kv[t] = to_f(kc[t]);
      for (int r = 0; r < kRows; ++r) {
        const float qv = q[r * q_stride + i];
#pragma omp simd
        for (int64_t t = 0; t < kLanes; ++t) acc[r][t] = std::fma(qv, kv[t], acc[r][t]);
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int64_t t = 0; t < kLanes; ++t) s[r * s_stride + t0 + t] = acc[r][t];
  }
  if (t0 == n) return;
  for (int r = 0; r < kRows; ++r) {
    float* sr = s + r * s_stride;
    for (int64_t t = t0; t < n; ++t) sr[t] = 0.0f;
    for (int64_t i = 0; i < d; ++i) {
      const float qv = q[r * q_stride + i];
      const T* kc = kb + i * bs;
      for (int64_t t = t0; t < n; ++t) sr[t] = std::fma(qv, to_f(kc[t]), sr[t]);
    }
  }
}

// Scores of every row of an item against one block: four rows at a time, then the rest.
template <typename T>
inline void score_block(const float* q, int64_t rows, const T* kb, int64_t d, int64_t bs, int64_t n, float* s) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) score_rows<4>(q + r * d, d, kb, d, bs, n, s + r * bs, bs);
  switch (rows - r) {
    case 3: score_rows<3>(q + r * d, d, kb, d, bs, n, s + r * bs, bs); break;
    case 2: score_rows<2>(q + r * d, d, kb, d, bs, n, s + r * bs, bs); break;
    case 1: score_rows<1>(q + r * d, d, kb, d, bs, n, s + r * bs, bs); break;
    default: break;
  }
}

// The head size is a compile-time constant where it is a common one (kD = 64, 128; 0 = any), so a
// row's accumulator stays in registers across a block's keys.
template <typename T, int64_t kD>
void attend_item(const AttnArgs& a, const Item& it, const T* q, const T* k_cache, const T* v_cache, T* out,
                 Scratch& w) {
  const int64_t d = kD > 0 ? kD : a.head_dim, group = a.num_heads / a.num_kv_heads;
  const int64_t bs = a.block_size, head_stride = bs * d;
  const int64_t q_begin = a.query_start[it.seq], nq = a.query_start[it.seq + 1] - q_begin;
  const int64_t ctx = a.seq_lens[it.seq];
  const int32_t* table = a.block_tables + it.seq * a.block_table_stride;
  const int64_t rows = (it.q1 - it.q0) * group;
  // Row r = (query q0 + r / group, head r % group): its last visible key is first_limit + r / group.
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = q + (q_begin + it.q0 + r / group) * a.q_stride + (it.kv_head * group + r % group) * d;
    for (int64_t i = 0; i < d; ++i) w.q[r * d + i] = to_f(src[i]) * a.scale;
    w.m[r] = -INFINITY;
    w.l[r] = 0.0f;
  }
  std::fill(w.acc.begin(), w.acc.begin() + rows * d, 0.0f);
  const int64_t first_limit = ctx - nq + it.q0;
  const int64_t num_keys = ctx - nq + it.q1;
  for (int64_t j0 = 0; j0 < num_keys; j0 += bs) {
    const int64_t block = table[j0 / bs];
    const T* kb = k_cache + (block * a.num_kv_heads + it.kv_head) * head_stride;  // [d, bs]
    const T* vb = v_cache + (block * a.num_kv_heads + it.kv_head) * head_stride;  // [bs, d]
    const int64_t n = std::min(bs, num_keys - j0);
    score_block(w.q.data(), rows, kb, d, bs, n, w.s.data());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t limit = first_limit + r / group;
      if (j0 > limit) continue;  // the whole block is in this row's future
      float* s = &w.s[r * bs];
      const int64_t visible = std::min(n, limit - j0 + 1);
      float mx = w.m[r];
      for (int64_t t = 0; t < visible; ++t) mx = max_f(mx, s[t]);
      const float corr = exp_f(w.m[r] - mx);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < visible; ++t) {
        s[t] = exp_f(s[t] - mx);
        sum += s[t];
      }
      w.l[r] = w.l[r] * corr + sum;
      w.m[r] = mx;
      float acc[kD > 0 ? kD : 1];
      float* ar = kD > 0 ? acc : &w.acc[r * d];
      if (kD > 0)
        for (int64_t i = 0; i < d; ++i) ar[i] = w.acc[r * d + i] * corr;
      else
        for (int64_t i = 0; i < d; ++i) ar[i] *= corr;
      for (int64_t t = 0; t < visible; ++t) {
        const float p = s[t];
        const T* vr = vb + t * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) ar[i] = std::fma(p, to_f(vr[i]), ar[i]);
      }
      if (kD > 0)
        for (int64_t i = 0; i < d; ++i) w.acc[r * d + i] = ar[i];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = out + ((q_begin + it.q0 + r / group) * a.num_heads + it.kv_head * group + r % group) * d;
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
    Scratch w(rows, a.head_dim, a.block_size);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) {
      if (a.head_dim == 64)
        attend_item<T, 64>(a, items[i], q, k_cache, v_cache, out, w);
      else if (a.head_dim == 128)
        attend_item<T, 128>(a, items[i], q, k_cache, v_cache, out, w);
      else
        attend_item<T, 0>(a, items[i], q, k_cache, v_cache, out, w);
    }
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
