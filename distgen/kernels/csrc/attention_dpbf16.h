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

// s[r][t0 .. t0 + 16 * kC) = scale * q_r . k_t for kR rows (bf16 q rows of kD, read as kD / 2 pairs).
template <int kR, int kC, int64_t kD>
inline void dp_scores(const uint32_t* q, const uint32_t* kp, int64_t keys, int64_t t0, float scale, float* s,
                      int64_t ps) {
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
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 2
    for (int c = 0; c < kC; ++c) _mm512_storeu_ps(s + r * ps + t0 + 16 * c, _mm512_mul_ps(a[r][c], sc));
}

template <int kR, int64_t kD>
inline void dp_score_rows(const uint32_t* q, const uint32_t* kp, int64_t keys, int64_t width, float scale, float* s,
                          int64_t ps) {
  int64_t t0 = 0;
  for (; t0 + 32 <= width; t0 += 32) dp_scores<kR, 2, kD>(q, kp, keys, t0, scale, s, ps);
  if (t0 < width) dp_scores<kR, 1, kD>(q, kp, keys, t0, scale, s, ps);
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
inline void score_tail(int64_t n, const uint32_t* q, const uint32_t* kp, int64_t keys, int64_t width, float scale,
                       float* s, int64_t ps) {
  if constexpr (kN > 0) {
    if (n == kN)
      dp_score_rows<kN, kD>(q, kp, keys, width, scale, s, ps);
    else
      score_tail<kN - 1, kD>(n, q, kp, keys, width, scale, s, ps);
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
// key pairs; V spans as [keys/2][D][2]), 16 x 16 outputs per instruction. Rows past the last whole tile
// take the vdpbf16ps functions above.

// s[r][0 .. width) = scale * q_r . k_t for 16 rows; width a multiple of 16.
template <int64_t kD>
inline void amx_scores(const uint32_t* q, const uint32_t* kp, int64_t keys, int64_t width, float scale, float* s,
                       int64_t ps) {
  for (int64_t t0 = 0; t0 < width; t0 += 16) {
    _tile_zero(0);
    for (int64_t i = 0; i < kD / 2; i += 16) {  // 16 dimension pairs a step
      _tile_loadd(4, q + i, kD * 2);
      _tile_loadd(6, kp + i * keys + t0, keys * 4);
      _tile_dpbf16ps(0, 4, 6);
    }
    _tile_stored(0, s + t0, ps * 4);
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < 16; ++r)
    for (int64_t t0 = 0; t0 < width; t0 += 16)
      _mm512_storeu_ps(s + r * ps + t0, _mm512_mul_ps(_mm512_loadu_ps(s + r * ps + t0), sc));
}

// acc[r] = acc[r] * corr[r] + sum_t p[r][t] v_t for 16 rows, over pairs16 (a multiple of 16) key pairs
// whose probabilities and V rows past the span are zero.
template <int64_t kD>
inline void amx_pv(float* acc, const float* corr, const uint32_t* p, int64_t pstride, const uint32_t* vp,
                   int64_t pairs16) {
  alignas(64) float pv[16][16];
  for (int64_t j = 0; j < kD; j += 16) {
    _tile_zero(0);
    for (int64_t t = 0; t < pairs16; t += 16) {
      _tile_loadd(4, p + t, pstride * 4);
      _tile_loadd(6, vp + t * kD + j, kD * 4);
      _tile_dpbf16ps(0, 4, 6);
    }
    _tile_stored(0, &pv[0][0], 64);
    for (int r = 0; r < 16; ++r) {
      float* ar = acc + r * kD + j;
      _mm512_storeu_ps(ar, _mm512_fmadd_ps(_mm512_loadu_ps(ar), _mm512_set1_ps(corr[r]), _mm512_loadu_ps(pv[r])));
    }
  }
}
#endif

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
  constexpr int kS = 6;  // score rows per register tile: 12 accumulators, each K load feeding 6 products
  int64_t r = 0, amx_rows = 0;
#if defined(DG_AMX)
  if (rows >= 16 && keys % 32 == 0 && amx_permitted()) {
    amx_rows = rows / 16 * 16;
    amx_configure();
    for (; r < amx_rows; r += 16) amx_scores<kD>(q + r * kD / 2, kp, keys, width, a.scale, &w.s[r * ps], ps);
  }
#endif
  for (; r + kS <= rows; r += kS)
    dp_score_rows<kS, kD>(q + r * kD / 2, kp, keys, width, a.scale, &w.s[r * ps], ps);
  score_tail<kS - 1, kD>(rows - r, q + r * kD / 2, kp, keys, width, a.scale, &w.s[r * ps], ps);
  uint32_t* p = w.ph.data();
  const int64_t pstride = keys / 2;
  for (r = 0; r < rows; ++r) {
    const int64_t limit = first_limit + r / group;  // the row's last visible key
    const int64_t visible = std::max<int64_t>(0, std::min(sp.n, limit - j0 + 1));
    const int64_t first = a.window > 0 ? std::clamp<int64_t>(limit - a.window + 1 - j0, 0, visible) : 0;
    float* sr = &w.s[r * ps];
    w.corr[r] = softmax_span_row(sr, static_cast<int32_t>(width), static_cast<int32_t>(first),
                                 static_cast<int32_t>(visible), a.softcap, w.m[r], &w.lv[r * 16]);
    for (int64_t t0 = 0; t0 < width; t0 += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + r * pstride + t0 / 2),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sr + t0)));
  }
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
    for (; r < amx_rows; r += 16) amx_pv<kD>(&w.acc[r * kD], &w.corr[r], p + r * pstride, pstride, vp, pairs16);
    _tile_release();
  }
#endif
  for (; r + kP <= rows; r += kP)
    dp_pv<kP, kD>(&w.acc[r * kD], &w.corr[r], p + r * pstride, pstride, vp, pairs);
  pv_tail<kP - 1, kD>(rows - r, &w.acc[r * kD], &w.corr[r], p + r * pstride, pstride, vp, pairs);
}

#endif  // __AVX512BF16__ && __AVX512BW__
