// Shared by distgen's CPU kernels (see cpu_build.py): plain C++ loops written so that the compiler
// vectorizes them for the CPU it is built on (-O3 -march=native), parallel with OpenMP (the runtime
// torch already loaded), and exported with a C ABI so that Python calls them through ctypes on
// tensors' data pointers.
//
// Each kernel matches the rounding of its plain-torch reference in distgen/layers: arithmetic in
// float32, with the result rounded to the tensor's dtype where the reference rounds it.
// Two storage types: float (fp32) and uint16_t holding bfloat16 bits (bf16).
#pragma once

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// Suffix _f32 / _bf16 of an exported name gives the storage type; pointers are to contiguous data
// unless a stride says not.
#define DG_EXPORT extern "C" __attribute__((visibility("default")))
#define DG_BOTH(MACRO) MACRO(f32, float) MACRO(bf16, bf16)

namespace dg {

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
  // A select, not an early return, so that loops over it vectorize.
  const uint32_t nearest = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet_nan = (u >> 16) | 0x40u;
  return static_cast<bf16>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : nearest);
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

// Sixteen float lanes as one value: an AVX-512 register, or two AVX2 ones; GCC lowers the operators to
// whatever -march offers. Accumulators declared as such values stay in registers, which the arrays of
// the general path do not always manage.
typedef float vf16 __attribute__((vector_size(64)));
typedef uint16_t vh16 __attribute__((vector_size(32)));
typedef uint32_t vu16 __attribute__((vector_size(64)));

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf16 load16(const bf16* p) {
#if defined(__AVX512F__)  // one widening load and a shift (GCC's tuning may split the generic form)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (vf16)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  vh16 h;
  std::memcpy(&h, p, sizeof h);
  const vu16 u = __builtin_convertvector(h, vu16) << 16;
  vf16 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
#endif
}
inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof v); }
// a * b + c lane by lane, fused (ISO C++ mode does not contract a * b + c on its own).
// In intrinsics where the CPU has the instructions: GCC's tuning for some CPUs (AMD Zen 4, and the
// rocketlake tuning -march=native picks for some virtualized Xeons) splits 512-bit generic vectors and
// then leaves the per-lane fma loop scalar, sixteen vfmadd...ss with masked broadcasts per call, which
// made the float32 GEMM twenty times slower on such a Xeon.
inline vf16 fma16(vf16 a, vf16 b, vf16 c) {
#if defined(__AVX512F__)
  return (vf16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX2__) && defined(__FMA__)
  vf16 r;
  __m256 lo[3], hi[3];
  std::memcpy(lo, &a, 32), std::memcpy(hi, reinterpret_cast<const char*>(&a) + 32, 32);
  std::memcpy(lo + 1, &b, 32), std::memcpy(hi + 1, reinterpret_cast<const char*>(&b) + 32, 32);
  std::memcpy(lo + 2, &c, 32), std::memcpy(hi + 2, reinterpret_cast<const char*>(&c) + 32, 32);
  const __m256 rl = _mm256_fmadd_ps(lo[0], lo[1], lo[2]), rh = _mm256_fmadd_ps(hi[0], hi[1], hi[2]);
  std::memcpy(&r, &rl, 32), std::memcpy(reinterpret_cast<char*>(&r) + 32, &rh, 32);
  return r;
#else
  vf16 r;
#pragma GCC unroll 16
  for (int l = 0; l < 16; ++l) r[l] = std::fma(a[l], b[l], c[l]);
  return r;
#endif
}
inline vf16 splat16(float x) {
#if defined(__AVX512F__)
  return (vf16)_mm512_set1_ps(x);
#else
  vf16 r;
#pragma GCC unroll 16
  for (int l = 0; l < 16; ++l) r[l] = x;
  return r;
#endif
}

// A vector loaded into a register, and one float broadcast to sixteen lanes straight from memory. With
// AVX-512, GCC otherwise folds a vector that several FMAs use into each of them as a memory operand
// (sixteen loads per key in place of four turn an FMA-bound loop into a load-bound one), and broadcasts
// by loading a whole vector and shuffling it (an FP-pipe op the broadcast load does not need).
#if defined(__AVX512F__)
inline vf16 load16_reg(const float* p) {
  vf16 r;
  asm("vmovups %1, %0" : "=v"(r) : "m"(*reinterpret_cast<const vf16*>(p)));
  return r;
}
inline vf16 bcast16(const float* p) {
  vf16 r;
  asm("vbroadcastss %1, %0" : "=v"(r) : "m"(*p));
  return r;
}
#else
inline vf16 load16_reg(const float* p) { return load16(p); }
inline vf16 bcast16(const float* p) { return splat16(*p); }
#endif
inline vf16 load16_reg(const bf16* p) { return load16(p); }  // a widening load is in a register anyway

typedef int32_t vi16 __attribute__((vector_size(64)));

// exp_f on sixteen lanes at once, with the same steps (so the same result in every lane). Loops over
// a row whose length or mask varies are not vectorized by GCC when exp_f is inlined in them; a row of
// spans written with this one is. With AVX-512 it is written in intrinsics: GCC's tuning for some CPUs
// (AMD Zen 4) splits 512-bit generic vectors in two and then leaves the per-lane fma and floor loops
// scalar, sixteen vfmadd...ss in a row.
#if defined(__AVX512F__)
__attribute__((always_inline)) inline vf16 exp16(vf16 xv) {
  __m512 x = _mm512_min_ps(_mm512_max_ps((__m512)xv, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  // x * log2(e) and + 0.5 rounded apart, as exp_f does (a fused form would pick another n at ties).
  const __m512 t = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(0.5f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return (vf16)_mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}
#else
__attribute__((always_inline)) inline vf16 exp16(vf16 x) {
  x = x < splat16(-87.0f) ? splat16(-87.0f) : x;
  x = x > splat16(88.0f) ? splat16(88.0f) : x;
  vf16 n = x * 1.44269504088896341f + 0.5f;
#pragma GCC unroll 16
  for (int l = 0; l < 16; ++l) n[l] = std::floor(n[l]);
  vf16 r = fma16(n, splat16(-0.693145751953125f), x);
  r = fma16(n, splat16(-1.428606765330187e-06f), r);
  vf16 p = splat16(1.0f / 5040.0f);
  p = fma16(p, r, splat16(1.0f / 720.0f));
  p = fma16(p, r, splat16(1.0f / 120.0f));
  p = fma16(p, r, splat16(1.0f / 24.0f));
  p = fma16(p, r, splat16(1.0f / 6.0f));
  p = fma16(p, r, splat16(0.5f));
  p = fma16(p, r, splat16(1.0f));
  p = fma16(p, r, splat16(1.0f));
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  vf16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
#endif

#if defined(__AVX512F__)
// 2^x to about 2e-7 relative (x <= 128; far below, 0): vscalefps applies the nearest integer n, a degree-5
// fit of 2^f on [-0.5, 0.5] gives the rest. Half exp16's instructions, for results rounded to bfloat16
// anyway, where exp16's step-for-step match with exp_f buys nothing.
inline __m512 exp2_16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.33952798e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.67076313e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55034068e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40222117e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93147200e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000005f));
  return _mm512_scalef_ps(p, n);
}
#endif

// Each lane rounded as a tensor of type T stores it (from_f's rounding, on sixteen lanes at once).
template <typename T>
inline vf16 round16(vf16 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
#if defined(__AVX512F__)  // the same integer steps in 512-bit intrinsics (see load16)
    const __m512i u = _mm512_castps_si512((__m512)v), hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i nearest = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), hi);
    const __m512i quiet = _mm512_or_si512(_mm512_and_si512(u, hi), _mm512_set1_epi32(0x400000));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return (vf16)_mm512_castsi512_ps(_mm512_mask_mov_epi32(nearest, nan, quiet));
#else
    vu16 u;
    std::memcpy(&u, &v, sizeof u);
    const vu16 nearest = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    const vu16 quiet = (u & 0xffff0000u) | 0x400000u;  // a NaN stays a NaN
    const vu16 r = (u & 0x7fffffffu) > 0x7f800000u ? quiet : nearest;
    std::memcpy(&v, &r, sizeof v);
    return v;
#endif
  }
}

// Stores sixteen lanes that round16<T> rounded (so the narrowing is exact).
template <typename T>
inline void store_rounded16(T* out, vf16 v) {
  if constexpr (std::is_same_v<T, float>) {
    store16(out, v);
  } else {
#if defined(__AVX512F__)
    const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512((__m512)v), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), h);
#else
    vu16 u;
    std::memcpy(&u, &v, sizeof u);
    const vh16 h = __builtin_convertvector(u >> 16, vh16);
    std::memcpy(out, &h, sizeof h);
#endif
  }
}

// The largest lane (max is exact in any order, so a shuffle tree gives what the loop gives).
inline float hmax16(vf16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps((__m512)v);
#else
  float m = v[0];
  for (int l = 1; l < 16; ++l) m = max_f(m, v[l]);
  return m;
#endif
}

}  // namespace dg
