// The linear layers' GEMM on quantized weights (distgen/kernels/quant.py): y[m, n] = sum_k x[m, k] W[n, k]
// (+ bias[n]), W kept in its block format and dequantized inside the product, one block of 32 weights
// at a time, into registers:
//   q8_0: d * q (int8 codes, float16 d per block)      q4_0: d * (q - 8) (4-bit codes, float16 d)
//   q4_1: d * q + m (4-bit codes, float16 d and m)      int8: s * q (int8 codes, float32 s per row)
// A 4-bit block is 16 bytes: byte j holds element j (low nibble) and j + 16 (high nibble), so one
// 16-byte load gives the block's two vectors of 16 weights.
//
// A tile is up to 4 rows of x by 4 output features: the 4 features' blocks are dequantized once and
// used by every row, and each (row, feature) pair keeps a vector of 16 partial sums for the whole of K,
// reduced once at the end. At one row (decode of one stream) each thread streams its share of the
// codes, 0.56 to 1.06 bytes per weight instead of 4; with more rows the dequantization is shared by
// the tile's rows.
//
// Every output is computed by the same sequence of operations whatever the number of rows, so a
// request's result does not depend on what else is in its batch.
#include <algorithm>

#include "common.h"

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using namespace dg;

constexpr int64_t kBlock = 32;
constexpr int kRowsMax = 4;
constexpr int kColsMax = 4;
enum Fmt { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kInt8 = 3 };

// Sixteen bytes widened to sixteen int32 lanes (GCC's generic conversion of byte vectors goes through
// scalar inserts, several times slower than the widening loads).
template <bool kSigned>
inline vi16 widen16(const uint8_t* p) {
  vi16 r;
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m512i v = kSigned ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
  std::memcpy(&r, &v, sizeof r);
#elif defined(__AVX2__)
  for (int h = 0; h < 2; ++h) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * h));
    const __m256i v = kSigned ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
    std::memcpy(reinterpret_cast<char*>(&r) + 32 * h, &v, 32);
  }
#else
  for (int l = 0; l < 16; ++l) r[l] = kSigned ? static_cast<int8_t>(p[l]) : p[l];
#endif
  return r;
}

inline float half_to_f(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// The quantized weight of one output feature: its codes and per-block scales (and minimums).
struct QRow {
  const uint8_t* codes;
  const uint16_t* d;  // float16 per block (q formats)
  const uint16_t* m;  // float16 per block (q4_1)
  float s;            // per-row scale (int8)
};

// Block b of a row as two vectors of 16 float32 weights (elements 0..15 and 16..31).
template <int kFmt>
inline void dequant_block(const QRow& w, int64_t b, vf16& lo, vf16& hi) {
  if constexpr (kFmt == kQ8_0 || kFmt == kInt8) {
    const float d = kFmt == kInt8 ? w.s : half_to_f(w.d[b]);
    lo = __builtin_convertvector(widen16<true>(w.codes + b * kBlock), vf16) * d;
    hi = __builtin_convertvector(widen16<true>(w.codes + b * kBlock + 16), vf16) * d;
  } else {
    const vi16 q = widen16<false>(w.codes + b * (kBlock / 2));
    vf16 ql = __builtin_convertvector(q & 15, vf16), qh = __builtin_convertvector(q >> 4, vf16);
    const float d = half_to_f(w.d[b]);
    if constexpr (kFmt == kQ4_0) {
      lo = (ql - 8.0f) * d;
      hi = (qh - 8.0f) * d;
    } else {  // q4_1: d * q + m (GCC fuses it: within one rounding of the reference)
      const float mn = half_to_f(w.m[b]);
      lo = ql * d + mn;
      hi = qh * d + mn;
    }
  }
}

// The last, partial block of an int8 row (K not a multiple of 32; its padded codes are zero).
template <typename T>
inline void load_tail(const T* x, int64_t i, int64_t k, vf16& lo, vf16& hi) {
  float buf[kBlock] = {};
  for (int64_t j = i; j < k; ++j) buf[j - i] = to_f(x[j]);
  std::memcpy(&lo, buf, sizeof lo);
  std::memcpy(&hi, buf + 16, sizeof hi);
}

// a * b + c, fused. GCC's generic vectors do not always stay vectors through this much inlining (the
// lane loop of fma16 came out as scalar FMAs here), so AVX-512 gets its intrinsic.
inline vf16 fma_v(vf16 a, vf16 b, vf16 c) {
#if defined(__AVX512F__)
  return (vf16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  return fma16(a, b, c);
#endif
}

template <int kFmt, int kR, int kC, bool kTail, typename T>
__attribute__((always_inline)) inline void step(const T* x, int64_t k, const QRow* w, int64_t b,
                                                vf16 (&acc)[kR][kC]) {
  vf16 wl[kC], wh[kC];
#pragma GCC unroll 16
  for (int c = 0; c < kC; ++c) dequant_block<kFmt>(w[c], b, wl[c], wh[c]);
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r) {
    vf16 xl, xh;
    if constexpr (kTail) {
      load_tail(x + r * k, b * kBlock, k, xl, xh);
    } else {
      xl = load16(x + r * k + b * kBlock);
      xh = load16(x + r * k + b * kBlock + 16);
    }
#pragma GCC unroll 16
    for (int c = 0; c < kC; ++c) acc[r][c] = fma_v(xh, wh[c], fma_v(xl, wl[c], acc[r][c]));
  }
}

template <int kFmt, int kR, int kC, typename T>
inline void tile(const T* x, int64_t k, const QRow* w, const T* bias, T* out, int64_t ldo) {
  vf16 acc[kR][kC];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < kC; ++c) acc[r][c] = vf16{};
  const int64_t full = k / kBlock;
  for (int64_t b = 0; b < full; ++b) step<kFmt, kR, kC, false>(x, k, w, b, acc);
  if (k % kBlock) step<kFmt, kR, kC, true>(x, k, w, full, acc);
  float res[kR][kC][16];
  std::memcpy(res, acc, sizeof res);
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < kC; ++c) {
      float* s = res[r][c];  // a fixed pairwise order
      for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) s[l] += s[l + width];
      const float b = bias ? to_f(bias[c]) : 0.0f;
      out[r * ldo + c] = from_f<T>(s[0] + b);
    }
}

template <int kFmt, int kC, typename T>
inline void tile_rows(int64_t rows, const T* x, int64_t k, const QRow* w, const T* bias, T* out, int64_t ldo) {
  switch (rows) {
    case 4: return tile<kFmt, 4, kC>(x, k, w, bias, out, ldo);
    case 3: return tile<kFmt, 3, kC>(x, k, w, bias, out, ldo);
    case 2: return tile<kFmt, 2, kC>(x, k, w, bias, out, ldo);
    default: return tile<kFmt, 1, kC>(x, k, w, bias, out, ldo);
  }
}

template <int kFmt, typename T>
void qlinear(T* out, const T* x, const uint8_t* codes, const void* scales, const uint16_t* mins,
             const T* bias, int64_t m, int64_t n, int64_t k) {
  const int64_t kp = (k + kBlock - 1) / kBlock * kBlock, nb = kp / kBlock;
  const int64_t row_bytes = (kFmt == kQ4_0 || kFmt == kQ4_1) ? kp / 2 : kp;
  const int64_t groups = (n + kColsMax - 1) / kColsMax, row_tiles = (m + kRowsMax - 1) / kRowsMax;
  const bool threads = groups * row_tiles > 1 && worth_threads(m * n * k / 8);
#pragma omp parallel for schedule(static) collapse(2) if (threads)
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t t = 0; t < row_tiles; ++t) {
      const int64_t c0 = g * kColsMax, cols = std::min<int64_t>(kColsMax, n - c0);
      const int64_t r0 = t * kRowsMax, rows = std::min<int64_t>(kRowsMax, m - r0);
      QRow w[kColsMax];
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t row = c0 + c;
        w[c].codes = codes + row * row_bytes;
        if constexpr (kFmt == kInt8) {
          w[c].s = static_cast<const float*>(scales)[row];
        } else {
          w[c].d = static_cast<const uint16_t*>(scales) + row * nb;
          w[c].m = mins ? mins + row * nb : nullptr;
        }
      }
      const T* b = bias ? bias + c0 : nullptr;
      T* o = out + r0 * n + c0;
      const T* xr = x + r0 * k;
      switch (cols) {
        case 4: tile_rows<kFmt, 4>(rows, xr, k, w, b, o, n); break;
        case 3: tile_rows<kFmt, 3>(rows, xr, k, w, b, o, n); break;
        case 2: tile_rows<kFmt, 2>(rows, xr, k, w, b, o, n); break;
        default: tile_rows<kFmt, 1>(rows, xr, k, w, b, o, n); break;
      }
    }
}

template <typename T>
void qlinear_any(int64_t fmt, T* out, const T* x, const uint8_t* codes, const void* scales,
                 const uint16_t* mins, const T* bias, int64_t m, int64_t n, int64_t k) {
  switch (fmt) {
    case kQ8_0: return qlinear<kQ8_0>(out, x, codes, scales, mins, bias, m, n, k);
    case kQ4_0: return qlinear<kQ4_0>(out, x, codes, scales, mins, bias, m, n, k);
    case kQ4_1: return qlinear<kQ4_1>(out, x, codes, scales, mins, bias, m, n, k);
    default: return qlinear<kInt8>(out, x, codes, scales, mins, bias, m, n, k);
  }
}

}  // namespace

// ---- C ABI ------------------------------------------------------------------------------------------

#define DG_QGEMM(SUF, T)                                                                                 \
  DG_EXPORT void dg_qlinear_##SUF(void* out, const void* x, const void* codes, const void* scales,       \
                                  const void* mins, const void* bias, int64_t m, int64_t n, int64_t k,   \
                                  int64_t fmt) {                                                         \
    qlinear_any(fmt, static_cast<T*>(out), static_cast<const T*>(x), static_cast<const uint8_t*>(codes), \
                scales, static_cast<const uint16_t*>(mins), static_cast<const T*>(bias), m, n, k);       \
  }
DG_BOTH(DG_QGEMM)
