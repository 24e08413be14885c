// Paged attention on the CPU: one call per step, reading K/V in place through the block tables.
#include <algorithm>
#include <type_traits>

#include "amx.h"
#include "common.h"

namespace {

using namespace dg;

// Cache layout on this path: V blocks are [Hkv, bs, D] as everywhere, but each K block is stored
// transposed, [Hkv, D, bs], so that scoring a query against a block's keys is D broadcast FMAs over
// bs contiguous lanes: no horizontal sums (which, kept in order without -ffast-math, cost more than
// the products) and no copy. rotary_store_kv (elementwise.cpp) writes K that way.
//
// One call serves a whole step: decode rows (one query each) and prefill chunks (many), each row's
// queries being the last ones of its context (query i of n attends keys [0, ctx - n + i]; with a
// sliding window of w keys, only the last w of them: [ctx - n + i - w + 1, ctx - n + i]).
// A work item is (sequence, KV head, tile of up to kQueryTile queries); its rows are every query of
// the tile times the query heads that share the KV head (GQA), so each key is read once per item.
// Keys are visited a block at a time with an online softmax.
// Each item reads (and on the bf16 path repacks) its keys once for all its rows: 32 queries a tile read
// them half as often as 16 did, which made bf16 prefill attention 1.4x faster (fp32 1.05x), where 64 gained
// nothing more and widens the causal diagonal's masked work.
constexpr int64_t kQueryTile = 32;

struct AttnArgs {
  int64_t num_seqs, num_heads, num_kv_heads, head_dim, block_size;
  // Query head j reads KV head (j + head_offset) / group. A tensor-parallel rank whose query heads
  // start inside a KV group (an uneven split) has an offset; otherwise it is 0 and group = H / Hkv.
  int64_t group, head_offset;
  int64_t q_stride;            // elements between consecutive query tokens
  int64_t block_table_stride;  // elements between rows of the block table
  const int32_t* block_tables;
  const int32_t* seq_lens;     // [B] context length, this step's tokens included
  const int32_t* query_start;  // [B + 1] offsets of each row's queries
  float scale;
  int64_t window;  // sliding window in keys (a query sees itself and the window - 1 keys before it); 0: none
  float softcap;   // scores become softcap * tanh(score / softcap) before the softmax; 0: none
};

// Query heads h0 .. h0 + heads - 1 share the item's KV head: the whole group, or its part on this rank.
struct Item {
  int64_t seq, kv_head, h0, heads, q0, q1;
};

// Per-thread scratch, sized once per call. The bf16 dot-product path (attention_dpbf16.h) also keeps the
// queries as bf16 pairs (qh), the span's K and V repacked in pairs (kp, vp) and the probabilities in bf16
// (ph), each as 32-bit words holding one pair.
// The tiled path keeps each row's softmax denominator as sixteen lane sums (lv), added up once per item.
// m and corr hold whole vectors of rows (the bf16 softmax reads them sixteen rows at a time).
struct Scratch {
  std::vector<float> q, acc, m, l, lv, corr, s;
  std::vector<uint32_t> qh, kp, vp, ph;
  int64_t keys;                 // score row stride: a block or the call's longest span, whichever is longer
  bool amx_configured = false;  // this thread loaded the tile configuration (amx.h) during the call
  Scratch(int64_t rows, int64_t d, int64_t keys)
      : q(rows * d), acc(rows * d), m(rows + 16), l(rows), lv(rows * 16), corr(rows + 16), s(rows * keys),
        qh(rows * d / 2 + 1), kp(d * keys / 2 + 8), vp(d * keys / 2 + 8), ph(rows * keys / 2 + 8), keys(keys) {}
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
inline void score_block(const float* q, int64_t rows, const T* kb, int64_t d, int64_t bs, int64_t n, float* s,
                        int64_t ps) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) score_rows<4>(q + r * d, d, kb, d, bs, n, s + r * ps, ps);
  switch (rows - r) {
    case 3: score_rows<3>(q + r * d, d, kb, d, bs, n, s + r * ps, ps); break;
    case 2: score_rows<2>(q + r * d, d, kb, d, bs, n, s + r * ps, ps); break;
    case 1: score_rows<1>(q + r * d, d, kb, d, bs, n, s + r * ps, ps); break;
    default: break;
  }
}

// ---- The tiled path: head size 64, 128 or 256 (Gemma's), blocks a multiple of 16 tokens (the engine's shapes) ------
// s[r * ps + t0 .. + 16) = q_r . k_t for kR rows of q [kR, kD] against a transposed K block [kD, bs]. Two
// accumulators per row (even and odd dimensions) give 2 * kR independent FMA chains.
template <int kR, int64_t kD, typename T>
inline void score_tile(const float* q, const T* kb, int64_t bs, int64_t t0, float* s, int64_t ps) {
  vf16 even[kR], odd[kR];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r) even[r] = odd[r] = vf16{};
#pragma GCC unroll 4
  for (int64_t i = 0; i < kD; i += 2) {
    const vf16 k0 = load16(kb + i * bs + t0), k1 = load16(kb + (i + 1) * bs + t0);
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      even[r] = fma16(splat16(q[r * kD + i]), k0, even[r]);
      odd[r] = fma16(splat16(q[r * kD + i + 1]), k1, odd[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r) store16(s + r * ps + t0, even[r] + odd[r]);
}

// Up to kSpanKeys consecutive keys of a row's context, in the blocks that hold them: the unit of one
// online-softmax update. A span of several blocks pays the update (max, rescale) once for all of them.
// The FMA path keeps a span's scores of six rows in L1 (64 keys); the vdpbf16ps/AMX path of prefill
// items (attention_dpbf16.h) takes 256, so that the per-span work that does not scale with the keys
// (each row's maximum and rescale factor, the rescale of its accumulators, the tile stores of the
// weighted V sums) is paid once for four times the keys.
constexpr int64_t kSpanKeys = 64;
constexpr int64_t kSpanKeysDp = 256;

template <typename T>
struct Span {
  const T* k[kSpanKeysDp / 16];  // transposed K blocks [d, bs]
  const T* v[kSpanKeysDp / 16];  // V blocks [bs, d]
  int64_t blocks, n;           // blocks in the span, keys in it (the last block may be partial)
};

// acc[r] = acc[r] * corr[r] + sum_t p[r][t] v_t over the span's n keys, for kR rows; the kR * kD / 16
// accumulators live in registers for the whole span.
template <int kR, int64_t kD, typename T>
inline void pv_rows(float* acc, const float* corr, const float* p, int64_t ps, int64_t bs, const Span<T>& sp) {
  constexpr int kV = static_cast<int>(kD / 16);
  vf16 a[kR][kV];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < kV; ++j) a[r][j] = load16(acc + r * kD + 16 * j) * corr[r];
  for (int64_t b = 0; b < sp.blocks; ++b) {
    const int64_t n = std::min(bs, sp.n - b * bs);
    for (int64_t t = 0; t < n; ++t) {
      vf16 v[kV];
#pragma GCC unroll 16
      for (int j = 0; j < kV; ++j) v[j] = load16_reg(sp.v[b] + t * kD + 16 * j);
#pragma GCC unroll 16
      for (int r = 0; r < kR; ++r) {
        const vf16 pr = bcast16(&p[r * ps + b * bs + t]);
#pragma GCC unroll 16
        for (int j = 0; j < kV; ++j) a[r][j] = fma16(pr, v[j], a[r][j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < kV; ++j) store16(acc + r * kD + 16 * j, a[r][j]);
}

// s[r][0..32) = q_r . k for kR rows against two 16-key chunks of transposed K ([kD] rows bs apart):
// 2 * kR accumulators, each q broadcast feeding two FMAs, as the GEMM's tile does.
template <int kR, int64_t kD, typename T>
inline void score_pair(const float* q, const T* k0, const T* k1, int64_t bs, float* s0, float* s1, int64_t ps) {
  vf16 a0[kR], a1[kR];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r) a0[r] = a1[r] = vf16{};
#pragma GCC unroll 4
  for (int64_t i = 0; i < kD; ++i) {
    const vf16 x0 = load16_reg(k0 + i * bs), x1 = load16_reg(k1 + i * bs);
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      const vf16 qv = bcast16(&q[r * kD + i]);
      a0[r] = fma16(qv, x0, a0[r]);
      a1[r] = fma16(qv, x1, a1[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r) {
    store16(s0 + r * ps, a0[r]);
    store16(s1 + r * ps, a1[r]);
  }
}

// Scores of kR rows against every key of the span (whole blocks), 32 keys at a time.
template <int kR, int64_t kD, typename T>
inline void score_span(const float* q, const Span<T>& sp, int64_t bs, float* s, int64_t ps) {
  const int64_t chunks = sp.blocks * bs / 16;
  auto chunk = [&](int64_t c) { return sp.k[c * 16 / bs] + (c * 16) % bs; };
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2) score_pair<kR, kD>(q, chunk(c), chunk(c + 1), bs, s + c * 16, s + c * 16 + 16, ps);
  if (c < chunks) score_tile<kR, kD>(q, chunk(c), bs, 0, s + c * 16, ps);
}

// Logit soft-capping (Gemma 2): softcap * tanh(s / softcap) for keys [lo, hi) of a score row.
inline void cap_scores(float* s, int64_t lo, int64_t hi, float softcap) {
  if (softcap <= 0.0f) return;
  const float inv = 1.0f / softcap;
  for (int64_t t = lo; t < hi; ++t) s[t] = softcap * std::tanh(s[t] * inv);
}

// The online-softmax update of one row for a span: p = exp(s - max) in place for its visible keys
// [first, visible) and 0 elsewhere (so every row can take the span's keys alike); returns the factor
// that rescales the row's accumulator. Masking is by selects, so whatever the cache holds outside a
// row's visible keys or past the span's end (even NaN) never reaches the row. The row's denominator
// stays sixteen lane sums (lsum), so no span pays a horizontal add.
// The largest of a score row's values at its visible keys [first, visible) of [0, width); -inf where
// none is. 16-key chunks visible in full take no masks.
inline float visible_max(const float* sr, int32_t width, int32_t first, int32_t visible) {
  const vi16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  vf16 mv = splat16(-INFINITY);
  for (int32_t t0 = 0; t0 < width; t0 += 16) {
    const vf16 x = load16(sr + t0);
    if (t0 >= first && t0 + 16 <= visible)
      mv = x > mv ? x : mv;
    else
      mv = ((lanes + t0 >= first) & (lanes + t0 < visible) & (x > mv)) ? x : mv;
  }
  return hmax16(mv);
}

inline float softmax_span_row(float* sr, int32_t width, int32_t first, int32_t visible, float softcap, float& m,
                              float* lsum) {
  const vi16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  cap_scores(sr, first, visible, softcap);
  auto whole = [&](int32_t t0) { return t0 >= first && t0 + 16 <= visible; };
  const float mx = max_f(m, visible_max(sr, width, first, visible));
  const float corr = visible > first ? exp_f(m - mx) : 1.0f;
  const vf16 mxv = splat16(mx);
  vf16 sum = {};
  for (int32_t t0 = 0; t0 < width; t0 += 16) {
    vf16 e;
    if (whole(t0))
      e = exp16(load16(sr + t0) - mxv);
    else
      e = ((lanes + t0 >= first) & (lanes + t0 < visible)) ? exp16(load16(sr + t0) - mxv) : vf16{};
    store16(sr + t0, e);
    sum += e;
  }
  store16(lsum, load16(lsum) * corr + sum);
  m = mx;
  return corr;
}

template <int kR, int64_t kD, typename T>
inline void score_rows_of(Scratch& w, int64_t r, const Span<T>& sp, int64_t bs) {
  score_span<kR, kD>(&w.q[r * kD], sp, bs, &w.s[r * w.keys], w.keys);
}

// One span for every row of an item: scores (six rows per register tile), the softmax update row by
// row, then the weighted sum of V (as many rows per pass as their accumulators fit in registers).
template <int64_t kD, typename T>
inline void span_all_rows(Scratch& w, const AttnArgs& a, int64_t rows, int64_t bs, const Span<T>& sp, int64_t j0,
                          int64_t first_limit, int64_t group) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) score_rows_of<6, kD>(w, r, sp, bs);
  switch (rows - r) {
    case 5: score_rows_of<5, kD>(w, r, sp, bs); break;
    case 4: score_rows_of<4, kD>(w, r, sp, bs); break;
    case 3: score_rows_of<3, kD>(w, r, sp, bs); break;
    case 2: score_rows_of<2, kD>(w, r, sp, bs); break;
    case 1: score_rows_of<1, kD>(w, r, sp, bs); break;
    default: break;
  }
  const int32_t width = static_cast<int32_t>(sp.blocks * bs);
  for (r = 0; r < rows; ++r) {
    const int64_t limit = first_limit + r / group;  // the row's last visible key
    const int64_t visible = std::max<int64_t>(0, std::min(sp.n, limit - j0 + 1));
    const int64_t first = a.window > 0 ? std::clamp<int64_t>(limit - a.window + 1 - j0, 0, visible) : 0;
    w.corr[r] = softmax_span_row(&w.s[r * w.keys], width, static_cast<int32_t>(first),
                                 static_cast<int32_t>(visible), a.softcap, w.m[r], &w.lv[r * 16]);
  }
  constexpr int kMax = kD <= 64 ? 4 : kD <= 128 ? 2 : 1;  // the accumulators of kMax rows fill the registers
  const int64_t ps = w.keys;
  for (r = 0; r + kMax <= rows; r += kMax)
    pv_rows<kMax, kD>(&w.acc[r * kD], &w.corr[r], &w.s[r * ps], ps, bs, sp);
  switch (rows - r) {
    case 3: pv_rows<3, kD>(&w.acc[r * kD], &w.corr[r], &w.s[r * ps], ps, bs, sp); break;
    case 2: pv_rows<2, kD>(&w.acc[r * kD], &w.corr[r], &w.s[r * ps], ps, bs, sp); break;
    case 1: pv_rows<1, kD>(&w.acc[r * kD], &w.corr[r], &w.s[r * ps], ps, bs, sp); break;
    default: break;
  }
}

}  // namespace

#include "attention_dpbf16.h"

namespace {

#if defined(DG_ATTN_DPBF16)
constexpr bool kDpAvailable = true;
#else
constexpr bool kDpAvailable = false;
#endif
constexpr int64_t kDpMinQueries = 4;

// Whether a bf16 item of this many queries takes the vdpbf16ps path (on the tiled path only), and with
// it the longer spans: the one rule for an item (attend_item) and for the scratch of a call.
template <typename T>
constexpr bool dp_queries(int64_t queries) {
  return std::is_same_v<T, bf16> && kDpAvailable && queries >= kDpMinQueries;
}

// Blocks are scattered through the cache, each one or two pages of its own, so the hardware prefetcher
// (which stops at page boundaries) finds every block cold. The next block's K and V are requested while
// this one is scored: the loads then overlap the arithmetic instead of stalling it.
template <typename T>
inline void prefetch_block(const T* k_cache, const T* v_cache, int64_t block, int64_t num_kv_heads,
                           int64_t kv_head, int64_t head_stride) {
  const char* kn = reinterpret_cast<const char*>(k_cache + (block * num_kv_heads + kv_head) * head_stride);
  const char* vn = reinterpret_cast<const char*>(v_cache + (block * num_kv_heads + kv_head) * head_stride);
  const int64_t bytes = head_stride * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(kn + off, 0, 1);
    __builtin_prefetch(vn + off, 0, 1);
  }
}

// The general path (any head size, any block size): a block at a time, row by row.
template <int64_t kD, typename T>
void general_blocks(const AttnArgs& a, const Item& it, const T* k_cache, const T* v_cache, Scratch& w,
                    int64_t rows, int64_t first_limit, int64_t key0, int64_t num_keys) {
  const int64_t d = kD > 0 ? kD : a.head_dim, group = it.heads;
  const int64_t bs = a.block_size, head_stride = bs * d;
  const int32_t* table = a.block_tables + it.seq * a.block_table_stride;
  const int64_t ps = w.keys;
  for (int64_t j0 = key0; j0 < num_keys; j0 += bs) {
    const int64_t block = table[j0 / bs];
    const T* kb = k_cache + (block * a.num_kv_heads + it.kv_head) * head_stride;  // [d, bs]
    const T* vb = v_cache + (block * a.num_kv_heads + it.kv_head) * head_stride;  // [bs, d]
    const int64_t n = std::min(bs, num_keys - j0);
    if (j0 + bs < num_keys)
      prefetch_block(k_cache, v_cache, table[j0 / bs + 1], a.num_kv_heads, it.kv_head, head_stride);
    score_block(w.q.data(), rows, kb, d, bs, n, w.s.data(), ps);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t limit = first_limit + r / group;
      const int64_t lo = a.window > 0 ? limit - a.window + 1 : 0;  // the row's first visible key
      if (j0 > limit || j0 + n <= lo) continue;  // the whole block is in this row's future or past
      float* s = &w.s[r * ps];
      const int64_t visible = std::min(n, limit - j0 + 1), first = std::max<int64_t>(0, lo - j0);
      cap_scores(s, first, visible, a.softcap);
      float mx = w.m[r];
      for (int64_t t = first; t < visible; ++t) mx = max_f(mx, s[t]);
      const float corr = exp_f(w.m[r] - mx);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = first; t < visible; ++t) {
        s[t] = exp_f(s[t] - mx);
        sum += s[t];
      }
      w.l[r] = w.l[r] * corr + sum;
      w.m[r] = mx;
      float* ar = &w.acc[r * d];
      for (int64_t i = 0; i < d; ++i) ar[i] *= corr;
      for (int64_t t = first; t < visible; ++t) {
        const float p = s[t];
        const T* vr = vb + t * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) ar[i] = std::fma(p, to_f(vr[i]), ar[i]);
      }
    }
  }
}

// The head size is a compile-time constant where it is a common one (kD = 64, 128, 256; 0 = any). Those,
// with blocks a multiple of 16 tokens (the engine's), take the tiled path above; any other shape the
// general per-row code below.
template <typename T, int64_t kD>
void attend_item(const AttnArgs& a, const Item& it, const T* q, const T* k_cache, const T* v_cache, T* out,
                 Scratch& w) {
  const int64_t d = kD > 0 ? kD : a.head_dim, group = it.heads;
  const int64_t bs = a.block_size, head_stride = bs * d;
  const int64_t q_begin = a.query_start[it.seq], nq = a.query_start[it.seq + 1] - q_begin;
  const int64_t ctx = a.seq_lens[it.seq];
  const int32_t* table = a.block_tables + it.seq * a.block_table_stride;
  const int64_t rows = (it.q1 - it.q0) * group;
  // bf16 items of several queries (prefill chunks) take vdpbf16ps, whose repacking of each span pays off
  // over their rows; decode rows, too few to amortize it, stay on fp32 FMAs. The choice depends on the
  // queries only, so a tensor-parallel rank's heads get exactly their part of the whole result.
  // Only the tiled path has a vdpbf16ps span; each path reads its own copy of the queries (qh or q).
  const bool tiled = kD > 0 && bs % 16 == 0;
  const bool use_dp = tiled && dp_queries<T>(it.q1 - it.q0);
  // Row r = (query q0 + r / group, head h0 + r % group): its last visible key is first_limit + r / group.
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = q + (q_begin + it.q0 + r / group) * a.q_stride + (it.h0 + r % group) * d;
    if (use_dp)
      std::memcpy(&w.qh[r * d / 2], src, d * sizeof(bf16));
    else
      for (int64_t i = 0; i < d; ++i) w.q[r * d + i] = to_f(src[i]) * a.scale;
    w.m[r] = -INFINITY;
  }
  std::fill(w.acc.begin(), w.acc.begin() + rows * d, 0.0f);
  // Each path keeps the softmax denominators its own way: sixteen lane sums (tiled) or one sum a row.
  if (tiled)
    std::fill(w.lv.begin(), w.lv.begin() + rows * 16, 0.0f);
  else
    std::fill(w.l.begin(), w.l.begin() + rows, 0.0f);
  const int64_t first_limit = ctx - nq + it.q0;
  const int64_t num_keys = ctx - nq + it.q1;
  // Blocks wholly before the first row's window (and so before every row's) are never read.
  const int64_t key0 = a.window > 0 ? std::max<int64_t>(0, first_limit - a.window + 1) / bs * bs : 0;
  if (tiled) {
    const int64_t per = std::max<int64_t>(1, (use_dp ? kSpanKeysDp : kSpanKeys) / bs);  // blocks per span
    for (int64_t j0 = key0; j0 < num_keys; j0 += per * bs) {
      Span<T> sp{};
      for (; sp.blocks < per && j0 + sp.blocks * bs < num_keys; ++sp.blocks) {
        const int64_t at = (table[j0 / bs + sp.blocks] * a.num_kv_heads + it.kv_head) * head_stride;
        sp.k[sp.blocks] = k_cache + at;
        sp.v[sp.blocks] = v_cache + at;
      }
      sp.n = std::min(per * bs, num_keys - j0);
      for (int64_t b = 0, next = j0 / bs + per; b < per && (next + b) * bs < num_keys; ++b)
        prefetch_block(k_cache, v_cache, table[next + b], a.num_kv_heads, it.kv_head, head_stride);
#if defined(DG_ATTN_DPBF16)
      if constexpr (std::is_same_v<T, bf16>) {
        if (use_dp) {
          span_all_rows_dp<kD>(w, a, rows, bs, sp, j0, first_limit, group);
          continue;
        }
      }
#endif
      span_all_rows<kD>(w, a, rows, bs, sp, j0, first_limit, group);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float l = 0.0f;
      for (int l16 = 0; l16 < 16; ++l16) l += w.lv[r * 16 + l16];
      w.l[r] = l;
    }
  } else {
    general_blocks<kD>(a, it, k_cache, v_cache, w, rows, first_limit, key0, num_keys);
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = out + ((q_begin + it.q0 + r / group) * a.num_heads + it.h0 + r % group) * d;
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
      for (int64_t h = 0; h < a.num_kv_heads; ++h) {
        const int64_t h0 = std::max<int64_t>(0, h * a.group - a.head_offset);
        const int64_t h1 = std::min(a.num_heads, (h + 1) * a.group - a.head_offset);
        if (h1 > h0) items.push_back({b, h, h0, h1 - h0, q0, std::min(nq, q0 + kQueryTile)});
      }
  }
  const int64_t n = static_cast<int64_t>(items.size());
  // Scratch for the largest item of this call only: a decode step's items have one query each, and
  // scratch sized for a whole query tile (96 rows of the default model) cost a tenth of its time.
  int64_t tile = 1;
  for (const Item& it : items) tile = std::max(tile, it.q1 - it.q0);
  const int64_t rows = tile * a.group;
  // Spans as long as the longest path of this call takes (an item's path depends on its query count).
  const int64_t span_keys = std::max(a.block_size, dp_queries<T>(tile) ? kSpanKeysDp : kSpanKeys);
#pragma omp parallel if (n > 1)
  {
    Scratch w(rows, a.head_dim, span_keys);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) {
      if (a.head_dim == 64)
        attend_item<T, 64>(a, items[i], q, k_cache, v_cache, out, w);
      else if (a.head_dim == 128)
        attend_item<T, 128>(a, items[i], q, k_cache, v_cache, out, w);
      else if (a.head_dim == 256)
        attend_item<T, 256>(a, items[i], q, k_cache, v_cache, out, w);
      else
        attend_item<T, 0>(a, items[i], q, k_cache, v_cache, out, w);
    }
#if defined(DG_AMX)
    if (w.amx_configured) _tile_release();
#endif
  }
}

}  // namespace

// ---- C ABI ----------------------------------------------------------------------------------------

#define DG_ATTN(SUF, T)                                                                                 \
  DG_EXPORT void dg_paged_attention_##SUF(                                                              \
      void* out, const void* q, const void* k_cache, const void* v_cache, const int32_t* block_tables,  \
      const int32_t* seq_lens, const int32_t* query_start, int64_t num_seqs, int64_t num_heads,         \
      int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t group, int64_t head_offset,   \
      int64_t q_stride, int64_t block_table_stride, float scale, int64_t window, float softcap) {       \
    AttnArgs a{num_seqs,    num_heads,    num_kv_heads, head_dim,    block_size, group,  head_offset,     \
               q_stride,    block_table_stride, block_tables, seq_lens, query_start, scale, window, softcap}; \
    paged_attention(a, static_cast<const T*>(q), static_cast<const T*>(k_cache),                        \
                    static_cast<const T*>(v_cache), static_cast<T*>(out));                              \
  }
DG_BOTH(DG_ATTN)
