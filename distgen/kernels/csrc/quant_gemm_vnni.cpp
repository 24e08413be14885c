// The quantized GEMM with int8 activations (llama.cpp's way), for CPUs with AVX-512 VNNI: each row of x
// is quantized per block of 32 (dx = max|x| / 127, xq = round(x / dx)), then each pair of blocks of a
// weight row meets the pair of x blocks in one vpdpbusd (64 byte products, 4 summed per int32 lane),
// scaled by d * dx per block in float32. The result equals x' @ W^T, x' the quantize-dequantized
// activations, up to float32 rounding: see quant_linear_int8_ref in reference.py.
//
// Operand layout: vpdpbusd multiplies unsigned bytes by signed ones. 4-bit codes are unsigned, so
// they are the unsigned side and x the signed one; an x block pair is stored in the order of a
// nibble-unpacked code pair: [b0 0..15, b1 0..15, b0 16..31, b1 16..31]. int8 codes are signed, so x
// is stored offset by 128 (unsigned) and the offset's contribution, 128 * sum(w) per lane, is
// subtracted by starting the accumulator at it. q4_0's -8 and q4_1's minimum add d * (-8) * s_b or
// m_b * s_b per block, with s_b = dx * sum(xq_b), summed after the main loop.
//
// Every output is computed by the same operations whatever the number of rows (batch invariance).
#include <algorithm>
#include <vector>

#include "common.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__) && defined(__AVX512VL__)
#include <immintrin.h>
#define DG_QVNNI 1
#endif

namespace {

using namespace dg;

#ifdef DG_QVNNI
constexpr int64_t kBlock = 32;
constexpr int kRowsMax = 4;
constexpr int kColsMax = 4;
enum Fmt { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kInt8 = 3 };

struct QuantX {
  int64_t pairs;               // block pairs per row (the last one may hold one real block)
  std::vector<int8_t> q;       // [m][pairs * 64], in the order the format's codes take
  std::vector<float> dx;       // [m][pairs][16]: each int32 lane's block scale
  std::vector<float> s;        // [m][pairs * 2]: dx * sum(xq) per block
};

template <typename T>
QuantX quantize_x(const T* x, int64_t m, int64_t k, bool nibbles) {
  QuantX qx;
  const int64_t nb = (k + kBlock - 1) / kBlock;
  qx.pairs = (nb + 1) / 2;
  qx.q.assign(m * qx.pairs * 64, 0);
  qx.dx.assign(m * qx.pairs * 16, 0.0f);
  qx.s.assign(m * qx.pairs * 2, 0.0f);
#pragma omp parallel for if (m * k > (1 << 16))
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      float v[kBlock] = {};
      const int64_t n = std::min<int64_t>(kBlock, k - b * kBlock);
      for (int64_t j = 0; j < n; ++j) v[j] = to_f(x[r * k + b * kBlock + j]);
      float amax = 0.0f;
      for (int j = 0; j < kBlock; ++j) amax = max_f(amax, std::fabs(v[j]));
      const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
      const int64_t p = b / 2, h = b % 2;
      int8_t* dst = qx.q.data() + (r * qx.pairs + p) * 64;
      int32_t sum = 0;
      for (int j = 0; j < kBlock; ++j) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(v[j] * id));
        sum += q;
        if (nibbles)
          dst[(j < 16 ? 0 : 32) + h * 16 + (j % 16)] = static_cast<int8_t>(q);
        else
          dst[h * 32 + j] = static_cast<int8_t>(q ^ 0x80);  // offset by 128, read as unsigned
      }
      float* lanes = qx.dx.data() + (r * qx.pairs + p) * 16;
      for (int l = 0; l < 16; ++l)
        if ((nibbles ? (l / 4) % 2 : l / 8) == h) lanes[l] = d;
      qx.s[r * qx.pairs * 2 + b] = d * static_cast<float>(sum);
    }
  return qx;
}

// Blocks 2p and 2p + 1 of one weight row as the unsigned/signed operand, its lane scales and, for
// int8 codes, the accumulator start that cancels x's offset.
template <int kFmt>
inline void weight_pair(const uint8_t* codes, const uint16_t* d, float row_scale, int64_t p, int64_t nb,
                        __m512i& w, __m512& dv, __m512i& start) {
  const bool two = 2 * p + 1 < nb;
  const float d0 = kFmt == kInt8 ? row_scale : _cvtsh_ss(d[2 * p]);
  const float d1 = two ? (kFmt == kInt8 ? row_scale : _cvtsh_ss(d[2 * p + 1])) : 0.0f;
  if constexpr (kFmt == kQ4_0 || kFmt == kQ4_1) {
    const __m256i raw = _mm256_maskz_loadu_epi8(two ? 0xffffffffu : 0xffffu, codes + p * 32);
    const __m256i mask = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(raw, mask), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    const __m256 half = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(d0)), _mm_set1_ps(d1), 1);
    dv = _mm512_insertf32x8(_mm512_castps256_ps512(half), half, 1);
    start = _mm512_setzero_si512();
  } else {
    w = _mm512_maskz_loadu_epi8(two ? ~0ull : 0xffffffffull, codes + p * 64);
    dv = _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1);
    const __m512i sum4 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), w);
    start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum4, 7));
  }
}

// sum_b term_b * s_b over a row's blocks: q4_0's -8 d_b, q4_1's m_b.
template <int kFmt>
inline float block_terms(const uint16_t* d, const uint16_t* mins, const float* s, int64_t nb) {
  if constexpr (kFmt != kQ4_0 && kFmt != kQ4_1) return 0.0f;
  const uint16_t* t = kFmt == kQ4_0 ? d : mins;
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 16 <= nb; b += 16) {
    const __m512 tv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + b)));
    acc = _mm512_fmadd_ps(tv, _mm512_loadu_ps(s + b), acc);
  }
  float sum = _mm512_reduce_add_ps(acc);
  for (; b < nb; ++b) sum += _cvtsh_ss(t[b]) * s[b];
  return kFmt == kQ4_0 ? -8.0f * sum : sum;
}

template <int kFmt, int kR, int kC, typename T>
inline void tile(const QuantX& qx, int64_t r0, const uint8_t* const* codes, const uint16_t* const* d,
                 const uint16_t* const* mins, const float* rs, int64_t nb, const T* bias, T* out, int64_t ldo) {
  __m512 acc[kR][kC];
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < qx.pairs; ++p) {
    __m512i w[kC], st[kC];
    __m512 dv[kC];
    for (int c = 0; c < kC; ++c) weight_pair<kFmt>(codes[c], d[c], rs[c], p, nb, w[c], dv[c], st[c]);
    for (int r = 0; r < kR; ++r) {
      const int64_t row = (r0 + r) * qx.pairs + p;
      const __m512i xv = _mm512_loadu_si512(qx.q.data() + row * 64);
      const __m512 dx = _mm512_loadu_ps(qx.dx.data() + row * 16);
      for (int c = 0; c < kC; ++c) {
        const __m512i dot = (kFmt == kQ4_0 || kFmt == kQ4_1) ? _mm512_dpbusd_epi32(st[c], w[c], xv)
                                                            : _mm512_dpbusd_epi32(st[c], xv, w[c]);
        acc[r][c] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dv[c]), dx, acc[r][c]);
      }
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < kC; ++c) {
      const float* s = qx.s.data() + (r0 + r) * qx.pairs * 2;
      const float v = _mm512_reduce_add_ps(acc[r][c]) + block_terms<kFmt>(d[c], mins[c], s, nb);
      out[r * ldo + c] = from_f<T>(v + (bias ? to_f(bias[c]) : 0.0f));
    }
}

template <int kFmt, int kC, typename T>
inline void tile_rows(int64_t rows, const QuantX& qx, int64_t r0, const uint8_t* const* codes,
                      const uint16_t* const* d, const uint16_t* const* mins, const float* rs, int64_t nb,
                      const T* bias, T* out, int64_t ldo) {
  switch (rows) {
    case 4: return tile<kFmt, 4, kC>(qx, r0, codes, d, mins, rs, nb, bias, out, ldo);
    case 3: return tile<kFmt, 3, kC>(qx, r0, codes, d, mins, rs, nb, bias, out, ldo);
    case 2: return tile<kFmt, 2, kC>(qx, r0, codes, d, mins, rs, nb, bias, out, ldo);
    default: return tile<kFmt, 1, kC>(qx, r0, codes, d, mins, rs, nb, bias, out, ldo);
  }
}

template <int kFmt, typename T>
void qlinear_vnni(T* out, const T* x, const uint8_t* codes, const void* scales, const uint16_t* mins,
                  const T* bias, int64_t m, int64_t n, int64_t k) {
  constexpr bool kNibbles = kFmt == kQ4_0 || kFmt == kQ4_1;
  const QuantX qx = quantize_x(x, m, k, kNibbles);
  const int64_t nb = (k + kBlock - 1) / kBlock, row_bytes = kNibbles ? nb * 16 : nb * 32;
  const int64_t groups = (n + kColsMax - 1) / kColsMax, row_tiles = (m + kRowsMax - 1) / kRowsMax;
  const bool threads = groups * row_tiles > 1 && worth_threads(m * n * k / 16);
#pragma omp parallel for schedule(static) collapse(2) if (threads)
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t t = 0; t < row_tiles; ++t) {
      const int64_t c0 = g * kColsMax, cols = std::min<int64_t>(kColsMax, n - c0);
      const int64_t r0 = t * kRowsMax, rows = std::min<int64_t>(kRowsMax, m - r0);
      const uint8_t* cp[kColsMax];
      const uint16_t* dp[kColsMax] = {};
      const uint16_t* mp[kColsMax] = {};
      float rs[kColsMax] = {};
      for (int64_t c = 0; c < cols; ++c) {
        cp[c] = codes + (c0 + c) * row_bytes;
        if constexpr (kFmt == kInt8) {
          rs[c] = static_cast<const float*>(scales)[c0 + c];
        } else {
          dp[c] = static_cast<const uint16_t*>(scales) + (c0 + c) * nb;
          mp[c] = mins ? mins + (c0 + c) * nb : nullptr;
        }
      }
      const T* b = bias ? bias + c0 : nullptr;
      T* o = out + r0 * n + c0;
      switch (cols) {
        case 4: tile_rows<kFmt, 4>(rows, qx, r0, cp, dp, mp, rs, nb, b, o, n); break;
        case 3: tile_rows<kFmt, 3>(rows, qx, r0, cp, dp, mp, rs, nb, b, o, n); break;
        case 2: tile_rows<kFmt, 2>(rows, qx, r0, cp, dp, mp, rs, nb, b, o, n); break;
        default: tile_rows<kFmt, 1>(rows, qx, r0, cp, dp, mp, rs, nb, b, o, n); break;
      }
    }
}

template <typename T>
void qlinear_vnni_any(int64_t fmt, T* out, const T* x, const uint8_t* codes, const void* scales,
                      const uint16_t* mins, const T* bias, int64_t m, int64_t n, int64_t k) {
  switch (fmt) {
    case kQ8_0: return qlinear_vnni<kQ8_0>(out, x, codes, scales, mins, bias, m, n, k);
    case kQ4_0: return qlinear_vnni<kQ4_0>(out, x, codes, scales, mins, bias, m, n, k);
    case kQ4_1: return qlinear_vnni<kQ4_1>(out, x, codes, scales, mins, bias, m, n, k);
    default: return qlinear_vnni<kInt8>(out, x, codes, scales, mins, bias, m, n, k);
  }
}
#endif

}  // namespace

// ---- C ABI ------------------------------------------------------------------------------------------

DG_EXPORT int64_t dg_qlinear_int8_available() {
#ifdef DG_QVNNI
  return 1;
#else
  return 0;
#endif
}

// Returns 0 (and computes nothing) where this build has no VNNI kernel.
#ifdef DG_QVNNI
#define DG_QVNNI_BODY(T)                                                                                  \
  qlinear_vnni_any(fmt, static_cast<T*>(out), static_cast<const T*>(x), static_cast<const uint8_t*>(codes), \
                   scales, static_cast<const uint16_t*>(mins), static_cast<const T*>(bias), m, n, k);       \
  return 1;
#else
#define DG_QVNNI_BODY(T) return 0;
#endif
#define DG_QGEMM_I8(SUF, T)                                                                                 \
  DG_EXPORT int64_t dg_qlinear_int8_##SUF(void* out, const void* x, const void* codes, const void* scales, \
                                          const void* mins, const void* bias, int64_t m, int64_t n,          \
                                          int64_t k, int64_t fmt) {                                         \
    DG_QVNNI_BODY(T)                                                                                        \
  }
DG_BOTH(DG_QGEMM_I8)
