// The bfloat16 span of paged attention on CPUs with AVX-512-BF16: scores and the weighted sum of V as
// vdpbf16ps (two bf16 products summed into a float32 lane per instruction, twice the multiply-adds of an
// fp32 FMA), instead of fp32 FMAs on converted loads. Included by attention.cpp after the types it uses
// (AttnArgs, Scratch, Span, softmax_span_row); only the tiled path (head size 64/128/256, blocks of a
// multiple of 16 tokens) takes it.
//
// vdpbf16ps pairs adjacent bf16 elements, so each operand must hold pairs along the summed axis:
// - scores sum over the head dimension: each K span is repacked as [D/2][keys][2] (dimensions 2i and
//   2i + 1 of one key side by side), and each query's own bf16 row already holds its dimension pairs;
// - the V sum runs over keys: each V span is repacked as [keys/2][D][2] (keys 2t and 2t + 1 of one
//   dimension side by side), and the probabilities are rounded to bf16, whose row holds key pairs.
// The repacking is a permute per 64 bytes, once per span for all of an item's rows. Products of bf16 are
// exact in float32 and the sums stay float32, so the scores are those of the fp32 path up to summation
// order; only the probabilities lose bits (bf16, as vLLM's CPU path rounds them too).
#pragma once

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define DG_ATTN_DPBF16 1
#include <immintrin.h>

// Elements 2j and 2j + 1 of the result are a[j] and b[j]: 16 bf16 of a row a and of a row b, interleaved.
inline __m512i interleave_rows(const bf16* a, const bf16* b) {
  static const uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  return _mm512_permutexvar_epi16(_mm512_loadu_si512(kIdx), both);
}

// K span -> kp [D/2][keys] of (dimension 2i, 2i + 1) pairs, keys in span order.
template <int64_t kD>
inline void pack_k_span(const Span<bf16>& sp, int64_t bs, uint32_t* kp, int64_t keys) {
  for (int64_t b = 0; b < sp.blocks; ++b)
    for (int64_t i = 0; i < kD / 2; ++i)
      for (int64_t t0 = 0; t0 < bs; t0 += 16) {
        const bf16* row = sp.k[b] + 2 * i * bs + t0;
        _mm512_storeu_si512(kp + i * keys + b * bs + t0, interleave_rows(row, row + bs));
      }
}

// V span -> vp [ceil(n/2)][D] of (key 2t, 2t + 1) pairs. A key past the span's last (n odd) is zeros, so
// its zero probability never meets whatever the cache holds there.
template <int64_t kD>
inline void pack_v_span(const Span<bf16>& sp, int64_t bs, uint32_t* vp) {
  alignas(64) static const bf16 kZeros[kD] = {};
  for (int64_t t = 0; t < sp.n; t += 2) {
    const bf16* v0 = sp.v[t / bs] + (t % bs) * kD;
    const bf16* v1 = t + 1 < sp.n ? v0 + kD : kZeros;  // t is even and bs a multiple of 16: same block
    for (int64_t j = 0; j < kD; j += 16) _mm512_storeu_si512(vp + (t / 2) * kD + j, interleave_rows(v0 + j, v1 + j));
  }
}

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// s[r][t0 .. t0 + 16 * kC) = q_r . k_t for kR rows (bf16 q rows of kD, read as kD / 2 pairs); the scale
// is applied in the softmax.
template <int kR, int kC, int64_t kD>
inline void dp_scores(const uint32_t* q, const uint32_t* kp, int64_t keys, int64_t t0, float* s, int64_t ps) {
  __m512 a[kR][kC];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 2
    for (int c = 0; c < kC; ++c) a[r][c] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t i = 0; i < kD / 2; ++i) {
    __m512bh x[kC];
#pragma GCC unroll 2
    for (int c = 0; c < kC; ++c) x[c] = as_bh(_mm512_loadu_si512(kp + i * keys + t0 + 16 * c));
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      const __m512bh qb = as_bh(_mm512_set1_epi32(static_cast<int>(q[r * (kD / 2) + i])));
#pragma GCC unroll 2
      for (int c = 0; c < kC; ++c) a[r][c] = _mm512_dpbf16_ps(a[r][c], x[c], qb);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 2
    for (int c = 0; c < kC; ++c) _mm512_storeu_ps(s + r * ps + t0 + 16 * c, a[r][c]);
}

template <int kR, int64_t kD>
inline void dp_score_rows(const uint32_t* q, const uint32_t* kp, int64_t keys, int64_t width, float* s, int64_t ps) {
  int64_t t0 = 0;
  for (; t0 + 32 <= width; t0 += 32) dp_scores<kR, 2, kD>(q, kp, keys, t0, s, ps);
  if (t0 < width) dp_scores<kR, 1, kD>(q, kp, keys, t0, s, ps);
}

// acc[r] = acc[r] * corr[r] + sum_t p[r][t] v_t over the span's key pairs, for kR rows; p rows are bf16,
// read as key pairs (pstride pairs apart).
template <int kR, int64_t kD>
inline void dp_pv(float* acc, const float* corr, const uint32_t* p, int64_t pstride, const uint32_t* vp,
                  int64_t pairs) {
  constexpr int kV = static_cast<int>(kD / 16);
  __m512 a[kR][kV];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < kV; ++j) a[r][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * kD + 16 * j), _mm512_set1_ps(corr[r]));
  for (int64_t t = 0; t < pairs; ++t) {
    __m512bh v[kV];
#pragma GCC unroll 16
    for (int j = 0; j < kV; ++j) v[j] = as_bh(_mm512_loadu_si512(vp + t * kD + 16 * j));
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      const __m512bh pb = as_bh(_mm512_set1_epi32(static_cast<int>(p[r * pstride + t])));
#pragma GCC unroll 16
      for (int j = 0; j < kV; ++j) a[r][j] = _mm512_dpbf16_ps(a[r][j], v[j], pb);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < kV; ++j) _mm512_storeu_ps(acc + r * kD + 16 * j, a[r][j]);
}

// The last n < kN + 1 rows of a loop over kN + 1-row tiles, as one tile of n rows.
template <int kN, int64_t kD>
inline void score_tail(int64_t n, const uint32_t* q, const uint32_t* kp, int64_t keys, int64_t width, float* s,
                       int64_t ps) {
  if constexpr (kN > 0) {
    if (n == kN)
      dp_score_rows<kN, kD>(q, kp, keys, width, s, ps);
    else
      score_tail<kN - 1, kD>(n, q, kp, keys, width, s, ps);
  }
}

template <int kN, int64_t kD>
inline void pv_tail(int64_t n, float* acc, const float* corr, const uint32_t* p, int64_t pstride, const uint32_t* vp,
                    int64_t pairs) {
  if constexpr (kN > 0) {
    if (n == kN)
      dp_pv<kN, kD>(acc, corr, p, pstride, vp, pairs);
    else
      pv_tail<kN - 1, kD>(n, acc, corr, p, pstride, vp, pairs);
  }
}

#if defined(DG_AMX)
// With AMX (amx.h), whole 16-row tiles of an item's rows score and sum V on tiles: tdpbf16ps takes the
// same pair layouts as vdpbf16ps (q rows of dimension pairs; K spans as [D/2][keys][2]; probabilities as
// key pairs; V spans as [keys/2][D][2]), in blocks of 32 rows x 32 keys or dimensions (amx_block). Rows
// past the last whole tile take the vdpbf16ps functions above.

// s[r][0 .. width) = q_r . k_t for the first rows16 rows (whole tiles); width a multiple of 16.
template <int64_t kD>
inline void amx_scores(const uint32_t* q, const uint32_t* kp, int64_t keys, int64_t rows16, int64_t width, float* s,
                       int64_t ps) {
  // K's tile rows are dimension pairs (keys * 4 bytes apart), a k step 16 of them; the next 16 keys 64 bytes on.
  for (int64_t r = 0; r < rows16; r += 32)
    for (int64_t t0 = 0; t0 < width; t0 += 32)
      amx_product(rows16 - r > 16, width - t0 > 16, q + r * kD / 2, q + (r + 16) * kD / 2, kD * 2, kp + t0,
                  keys * 4, 16 * keys * 4, 64, kD, s + r * ps + t0, ps * 4);
}

// acc[r] = acc[r] * corr[r] + sum_t p[r][t] v_t for the first rows16 rows (whole tiles), over pairs16 (a
// multiple of 16) key pairs whose probabilities and V rows past the span are zero.
template <int64_t kD>
inline void amx_pv(float* acc, const float* corr, const uint32_t* p, int64_t pstride, const uint32_t* vp,
                   int64_t rows16, int64_t pairs16) {
  alignas(64) float pv[32][kD];
  for (int64_t r = 0; r < rows16; r += 32) {
    const bool two = rows16 - r > 16;
    // V's tile rows are key pairs (kD * 4 bytes apart), a k step 16 of them; the next 16 dimensions 64 bytes on.
    for (int64_t j = 0; j < kD; j += 32)
      amx_product(two, true, p + r * pstride, p + (r + 16) * pstride, pstride * 4, vp + j, kD * 4, 16 * kD * 4, 64,
                  2 * pairs16, &pv[0][j], sizeof pv[0]);
    for (int64_t i = 0; i < (two ? 32 : 16); ++i) {
      float* ar = acc + (r + i) * kD;
      const __m512 c = _mm512_set1_ps(corr[r + i]);
      for (int64_t j = 0; j < kD; j += 16)
        _mm512_storeu_ps(ar + j, _mm512_fmadd_ps(_mm512_loadu_ps(ar + j), c, _mm512_loadu_ps(&pv[i][j])));
    }
  }
}
#endif

// The online-softmax update of one span for every row of a bf16 item, from its raw scores q . k:
// - each row's new maximum of scale * s over its visible keys [first, visible) (bounds(r, first, visible));
// - the factors that rescale the rows' accumulators, sixteen rows at once (exp_f per row would be a
//   chain of dependent FMAs each);
// - p = exp(scale * s - max) as 2^(scale * log2(e) * s - max * log2(e)), one FMA and exp2_16 a lane (its
//   2e-7 relative error is far below the bf16 rounding p then takes), rounded to bf16 into the
//   probability rows (key pairs, pstride words apart), 0 outside the visible keys, and the row's
//   sixteen lane sums (lv).
// Masking is by selects, as in softmax_span_row. With a softcap the scores are scaled and capped first.
template <typename Bounds>
inline void softmax_rows_bf16(Scratch& w, const AttnArgs& a, int64_t rows, int64_t width, Bounds bounds, uint32_t* p,
                              int64_t pstride) {
  const vi16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int64_t ps = w.keys;
  const float mul = a.softcap > 0.0f ? 1.0f : a.scale;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t first, visible;
    bounds(r, first, visible);
    float* sr = &w.s[r * ps];
    if (a.softcap > 0.0f) {
      for (int64_t t0 = 0; t0 < width; t0 += 16) store16(sr + t0, load16(sr + t0) * a.scale);
      cap_scores(sr, first, visible, a.softcap);
    }
    const int32_t lo = static_cast<int32_t>(first), hi = static_cast<int32_t>(visible);
    w.corr[r] = w.m[r];  // the old maximum until the factors below replace it
    // scale > 0 and rounding is monotonic, so the largest scaled score is the largest score scaled.
    if (visible > first) w.m[r] = max_f(w.m[r], visible_max(sr, static_cast<int32_t>(width), lo, hi) * mul);
  }
  for (int64_t r = 0; r < rows; r += 16) {  // m and corr hold whole vectors of rows (Scratch)
    const vf16 old = load16(&w.corr[r]), now = load16(&w.m[r]);
    // 1 where the maximum stayed, which also covers rows that have seen no key yet (-inf both).
    store16(&w.corr[r], old == now ? splat16(1.0f) : exp16(old - now));
  }
  for (int64_t r = 0; r < rows; ++r) {
    int64_t first, visible;
    bounds(r, first, visible);
    const float* sr = &w.s[r * ps];
    constexpr float kLog2e = 1.44269504088896341f;
    const __m512 sc = _mm512_set1_ps(mul * kLog2e), neg = _mm512_set1_ps(-w.m[r] * kLog2e);
    const int32_t lo = static_cast<int32_t>(first), hi = static_cast<int32_t>(visible);
    vf16 sum = {};
    for (int32_t t0 = 0; t0 < width; t0 += 16) {
      vf16 e = (vf16)exp2_16(_mm512_fmadd_ps(_mm512_loadu_ps(sr + t0), sc, neg));
      if (t0 < lo || t0 + 16 > hi) e = ((lanes + t0 >= lo) & (lanes + t0 < hi)) ? e : vf16{};
      sum += e;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + r * pstride + t0 / 2),
                          (__m256i)_mm512_cvtneps_pbh((__m512)e));
    }
    store16(&w.lv[r * 16], load16(&w.lv[r * 16]) * w.corr[r] + sum);
  }
}

// One span for every row of a bf16 item (see span_all_rows for the fp32 order of work).
template <int64_t kD>
inline void span_all_rows_dp(Scratch& w, const AttnArgs& a, int64_t rows, int64_t bs, const Span<bf16>& sp,
                             int64_t j0, int64_t first_limit, int64_t group) {
  const int64_t keys = w.keys, width = sp.blocks * bs, ps = w.keys;
  uint32_t* kp = w.kp.data();
  uint32_t* vp = w.vp.data();
  const uint32_t* q = w.qh.data();
  pack_k_span<kD>(sp, bs, kp, keys);
  pack_v_span<kD>(sp, bs, vp);
  int64_t amx_rows = 0;
#if defined(DG_AMX)
  if (rows >= 16 && keys % 32 == 0 && amx_permitted()) {
    amx_rows = rows / 16 * 16;
    if (!w.amx_configured) amx_configure(), w.amx_configured = true;  // released at the call's end
    amx_scores<kD>(q, kp, keys, amx_rows, width, w.s.data(), ps);
  }
#endif
  constexpr int kS = 6;  // score rows per register tile: 12 accumulators, each K load feeding 6 products
  int64_t r = amx_rows;
  for (; r + kS <= rows; r += kS) dp_score_rows<kS, kD>(q + r * kD / 2, kp, keys, width, &w.s[r * ps], ps);
  score_tail<kS - 1, kD>(rows - r, q + r * kD / 2, kp, keys, width, &w.s[r * ps], ps);
  uint32_t* p = w.ph.data();
  const int64_t pstride = keys / 2;
  auto bounds = [&](int64_t row, int64_t& first, int64_t& visible) {
    const int64_t limit = first_limit + row / group;  // the row's last visible key
    visible = std::max<int64_t>(0, std::min(sp.n, limit - j0 + 1));
    first = a.window > 0 ? std::clamp<int64_t>(limit - a.window + 1 - j0, 0, visible) : 0;
  };
  softmax_rows_bf16(w, a, rows, width, bounds, p, pstride);
  // The accumulators of kP rows (kP * kD / 16) plus one V pair-row (kD / 16) fill the 32 registers.
  constexpr int kP = kD <= 64 ? 6 : kD <= 128 ? 3 : 1;
  const int64_t pairs = (sp.n + 1) / 2;
  r = 0;
#if defined(DG_AMX)
  if (amx_rows) {
    // Whole tiles of 16 key pairs: the pairs past the span get zero V rows and zero probabilities (the
    // buffers may hold anything there, a NaN included).
    const int64_t pairs16 = (pairs + 15) / 16 * 16;
    std::fill(vp + pairs * kD, vp + pairs16 * kD, 0u);
    if (pairs16 > width / 2)
      for (int64_t i = 0; i < amx_rows; ++i) std::fill(p + i * pstride + width / 2, p + i * pstride + pairs16, 0u);
    amx_pv<kD>(w.acc.data(), w.corr.data(), p, pstride, vp, amx_rows, pairs16);
    r = amx_rows;
  }
#endif
  for (; r + kP <= rows; r += kP)
    dp_pv<kP, kD>(&w.acc[r * kD], &w.corr[r], p + r * pstride, pstride, vp, pairs);
  pv_tail<kP - 1, kD>(rows - r, &w.acc[r * kD], &w.corr[r], p + r * pstride, pstride, vp, pairs);
}

#endif  // __AVX512BF16__ && __AVX512BW__
