// The linear layers' GEMM on the CPU: y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]), with W packed once, at
// load, into panels of 16 output features:
// - float32: [ceil(N / 16)][K][16], so a step along k reads 16 consecutive weights;
// - bfloat16: [ceil(N / 16)][ceil(K / 2)][16][2], pairs of consecutive k per feature, the operand of
//   AVX-512-BF16's vdpbf16ps (two products summed into each float32 lane per instruction).
// A tile of up to 8 rows x 2 panels keeps its accumulators in registers for the whole of K; x is
// broadcast from its rows as they are, unpacked. One rows x 32-feature tile per work item, items split
// over the threads panel-major, so each thread streams its own contiguous share of the weights: at one
// row (decode of a single stream) that is a read of the weights at memory bandwidth, at 64 and more the
// tiles reuse each panel from cache and the FMA units set the pace.
//
// On CPUs with AMX, bfloat16 products whose K is a multiple of 32 run on AMX tiles instead, from the same
// packed weights (gemm_amx.h).
//
// A gate/up projection that feeds SiLU-and-mul is packed with its gate and up panels in turns, and its
// tiles store silu(gate) * up (linear<true>): the [M, 2I] product then never reaches memory.
//
// Every output is one accumulator summed in k order whatever the number of rows, so a request's
// result does not depend on what else is in its batch.
#include <algorithm>
#include <type_traits>

#include "common.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include "amx.h"

namespace {

using namespace dg;

constexpr int64_t kPanel = 16;  // output features per panel: one vector of accumulators
// Rows per tile: 8 x 2 panels of accumulators (16) plus the weights fit AVX-512's 32 registers, and 64
// rows (a full decode batch) split into whole tiles; AVX2's 16 registers hold 6 x 2 half-width ones.
#if defined(__AVX512F__)
constexpr int kRowsMax = 8;
#else
constexpr int kRowsMax = 6;
#endif
constexpr int kPanelsMax = 2;   // panels per tile

inline int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }

// Elements from one panel to the next: K rows of 16, or ceil(K / 2) rows of 16 pairs for bfloat16.
template <typename T>
inline int64_t panel_stride(int64_t k) {
  return std::is_same_v<T, bf16> ? (k + 1) / 2 * kPanel * 2 : k * kPanel;
}

void pack(float* dst, const float* w, int64_t n, int64_t k) {
#pragma omp parallel for
  for (int64_t p = 0; p < panels(n); ++p)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t row = p * kPanel + c;
        dst[(p * k + i) * kPanel + c] = row < n ? w[row * k + i] : 0.0f;
      }
}

void pack(bf16* dst, const bf16* w, int64_t n, int64_t k) {
  const int64_t kh = (k + 1) / 2;
#pragma omp parallel for
  for (int64_t p = 0; p < panels(n); ++p)
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t c = 0; c < kPanel; ++c)
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t row = p * kPanel + c, col = 2 * i + e;
          dst[((p * kh + i) * kPanel + c) * 2 + e] = row < n && col < k ? w[row * k + col] : bf16{0};
        }
}

// The first lim (<= 16) lanes of store_rounded16: a panel cut at n goes through a buffer.
template <typename T>
inline void store_rounded_part(T* out, vf16 v, int64_t lim) {
  if (lim == kPanel) {
    store_rounded16(out, v);
  } else {
    T part[kPanel];
    store_rounded16(part, v);
    std::memcpy(out, part, lim * sizeof(T));
  }
}

// Rounds the accumulators of one tile (plus the bias) into the output, the last panel cut at n. With
// kSilu the tile's two panels are a gate panel and its up panel, and it stores silu(gate) * up: each
// value rounded as the unfused GEMM and SiLU-and-mul kernels round it, so the result is theirs bit
// for bit.
template <int kR, int kC, bool kSilu, typename T>
inline void store_tile(const float (&acc)[kR][kC][16], const T* bias, T* out, int64_t ldo, int64_t cols) {
  if constexpr (kSilu) {
    static_assert(kC == 2, "a SiLU tile holds one gate panel and its up panel");
    const int64_t lim = std::min<int64_t>(kPanel, cols);
    for (int r = 0; r < kR; ++r) {
      // + 0: a -0 sum stored as +0, as the unfused GEMM's bias-less store gives it.
      const vf16 g = round16<T>(load16(acc[r][0]) + 0.0f), u = round16<T>(load16(acc[r][1]) + 0.0f);
      // exp16: exp_f's steps in every lane.
      const vf16 v = round16<T>(round16<T>(g / (splat16(1.0f) + exp16(-g))) * u);
      store_rounded_part(out + r * ldo, v, lim);
    }
    return;
  }
  // Sixteen lanes at a time (a scalar loop here costs as much as the AMX products of a 576-k tile). A
  // bias-less sum adds +0, so a -0 is stored as +0.
  for (int c = 0; c < kC; ++c) {
    const int64_t lim = std::min<int64_t>(kPanel, cols - c * kPanel);
    if (lim <= 0) continue;
    vf16 b = {};
    if (bias) {
      T part[kPanel] = {};
      std::memcpy(part, bias + c * kPanel, lim * sizeof(T));
      b = load16(part);
    }
    for (int r = 0; r < kR; ++r) {
      store_rounded_part(out + r * ldo + c * kPanel, round16<T>(load16(acc[r][c]) + b), lim);
    }
  }
}

// float32, and bfloat16 where the CPU lacks vdpbf16ps (each pair then becomes two float32 FMAs).
template <int kR, int kC, bool kSilu, typename T>
inline void tile_fma(const T* x, int64_t k, const T* wp, const T* bias, T* out, int64_t ldo, int64_t cols) {
  constexpr bool kPairs = std::is_same_v<T, bf16>;
  const int64_t stride = panel_stride<T>(k);
  vf16 acc[kR][kC];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < kC; ++c) acc[r][c] = vf16{};
  for (int64_t i = 0; i < k; i += kPairs ? 2 : 1) {
    vf16 w0[kC], w1[kC];
#pragma GCC unroll 16
    for (int c = 0; c < kC; ++c) {
      if constexpr (kPairs) {  // 16 (k, k+1) pairs: the even halves, then the odd ones
        vu16 u;
        std::memcpy(&u, wp + c * stride + i * kPanel, sizeof u);
        const vu16 lo = u << 16, hi = u & 0xffff0000u;
        std::memcpy(&w0[c], &lo, sizeof lo);
        std::memcpy(&w1[c], &hi, sizeof hi);
      } else {
        w0[c] = load16(wp + c * stride + i * kPanel);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      const vf16 x0 = splat16(to_f(x[r * k + i]));
#pragma GCC unroll 16
      for (int c = 0; c < kC; ++c) acc[r][c] = fma16(x0, w0[c], acc[r][c]);
      if constexpr (kPairs) {
        const vf16 x1 = splat16(i + 1 < k ? to_f(x[r * k + i + 1]) : 0.0f);
#pragma GCC unroll 16
        for (int c = 0; c < kC; ++c) acc[r][c] = fma16(x1, w1[c], acc[r][c]);
      }
    }
  }
  float res[kR][kC][16];
  std::memcpy(res, acc, sizeof res);
  store_tile<kR, kC, kSilu>(res, bias, out, ldo, cols);
}

#if defined(__AVX512BF16__)
// bfloat16 with vdpbf16ps: each instruction adds x[k] w[k] + x[k+1] w[k+1] into 16 float32 lanes.
template <int kR, int kC, bool kSilu>
inline void tile_dpbf16(const bf16* x, int64_t k, const bf16* wp, const bf16* bias, bf16* out, int64_t ldo,
                        int64_t cols) {
  const int64_t stride = panel_stride<bf16>(k);
  __m512 acc[kR][kC];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_setzero_ps();
  // x[k] in the low half of each 32-bit lane, x[k + 1] in the high half (zero past an odd K's end).
  auto step = [&](int64_t i, auto pair_of) {
    __m512bh w[kC];
#pragma GCC unroll 16
    for (int c = 0; c < kC; ++c) w[c] = (__m512bh)_mm512_loadu_si512(wp + c * stride + i * kPanel * 2);
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair_of(x + r * k + 2 * i));
#pragma GCC unroll 16
      for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xb, w[c]);
    }
  };
  for (int64_t i = 0; i < k / 2; ++i)
    step(i, [](const bf16* p) {
      int32_t v;
      std::memcpy(&v, p, 4);
      return v;
    });
  if (k % 2) step(k / 2, [](const bf16* p) { return static_cast<int32_t>(*p); });
  float res[kR][kC][16];
  std::memcpy(res, acc, sizeof res);
  store_tile<kR, kC, kSilu>(res, bias, out, ldo, cols);
}
#endif

template <int kR, int kC, bool kSilu, typename T>
inline void tile(const T* x, int64_t k, const T* wp, const T* bias, T* out, int64_t ldo, int64_t cols) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16>) return tile_dpbf16<kR, kC, kSilu>(x, k, wp, bias, out, ldo, cols);
#endif
  tile_fma<kR, kC, kSilu>(x, k, wp, bias, out, ldo, cols);
}

template <int kC, bool kSilu, typename T>
inline void tile_rows(int64_t rows, const T* x, int64_t k, const T* wp, const T* bias, T* out, int64_t ldo,
                      int64_t cols) {
  switch (rows) {
#if defined(__AVX512F__)
    case 8: return tile<8, kC, kSilu>(x, k, wp, bias, out, ldo, cols);
    case 7: return tile<7, kC, kSilu>(x, k, wp, bias, out, ldo, cols);
#endif
    case 6: return tile<6, kC, kSilu>(x, k, wp, bias, out, ldo, cols);
    case 5: return tile<5, kC, kSilu>(x, k, wp, bias, out, ldo, cols);
    case 4: return tile<4, kC, kSilu>(x, k, wp, bias, out, ldo, cols);
    case 3: return tile<3, kC, kSilu>(x, k, wp, bias, out, ldo, cols);
    case 2: return tile<2, kC, kSilu>(x, k, wp, bias, out, ldo, cols);
    default: return tile<1, kC, kSilu>(x, k, wp, bias, out, ldo, cols);
  }
}

// Rows are taken kBlockRows at a time (whole tiles), every panel of the weights for one block before the
// next block: the block's rows of x then stay in L2 while the weights stream past them, where a
// panel-major order over all rows would stream the whole of x from memory once per pair of panels (a
// 2048-row prefill chunk's x is several MB). Up to kBlockRows rows (a decode batch) this is the
// panel-major order itself.
constexpr int64_t kBlockRows = 8 * kRowsMax;

// One work item's share of a product: rows r0 .. r0 + rows of x against the panels from p0, which write
// output columns col0 .. col0 + cols; two_panels says whether the item has a second panel.
struct Tile {
  int64_t r0, rows, p0, col0, cols;
  bool two_panels;
};

// The work items of a product. Items run block by block, panel group by panel group, row tile by row
// tile; a last, shorter block has fewer row tiles, so items are counted rather than laid on a grid, and
// an even static split of them gives each thread equal work. kSilu: the panels are gate and up in turns,
// so a group of two is one 16-feature output slice.
template <bool kSilu>
struct TileItems {
  int64_t m, n, np, groups, tile_rows, block_rows, full_blocks, tiles_per_block, last_tiles;
  TileItems(int64_t m, int64_t n, int64_t tile_rows = kRowsMax, int64_t block_rows = kBlockRows)
      : m(m), n(n), np(kSilu ? 2 * panels(n) : panels(n)), groups((np + kPanelsMax - 1) / kPanelsMax),
        tile_rows(tile_rows), block_rows(block_rows), full_blocks(m / block_rows),
        tiles_per_block(block_rows / tile_rows), last_tiles((m % block_rows + tile_rows - 1) / tile_rows) {}
  int64_t items() const { return (full_blocks * tiles_per_block + last_tiles) * groups; }
  Tile at(int64_t i) const {
    const int64_t per_block = tiles_per_block * groups, b = i / per_block;
    const int64_t tiles = b < full_blocks ? tiles_per_block : last_tiles, j = i - b * per_block;
    const int64_t g = j / tiles, r0 = b * block_rows + (j % tiles) * tile_rows, p0 = g * kPanelsMax;
    const int64_t col0 = (kSilu ? g : p0) * kPanel;
    const int64_t cols = std::min<int64_t>((kSilu ? 1 : kPanelsMax) * kPanel, n - col0);
    return {r0, std::min(tile_rows, m - r0), p0, col0, cols, kSilu || np - p0 >= 2};
  }
};

#include "gemm_amx.h"

// kSilu: wp holds gate and up panels in turns (gate panel p, then up panel p) and n is the width of
// one half; out [m, n] = silu(x W_gate^T) * (x W_up^T), each panel group one 16-feature output slice.
template <bool kSilu, typename T>
void linear(T* out, const T* x, const T* wp, const T* bias, int64_t m, int64_t n, int64_t k) {
#if defined(DG_GEMM_AMX)
  if constexpr (std::is_same_v<T, bf16>)
    if (amx_takes(k)) return linear_amx<kSilu>(out, x, wp, bias, m, n, k);
#endif
  const TileItems<kSilu> work(m, n);
  const int64_t stride = panel_stride<T>(k), items = work.items();
#pragma omp parallel for schedule(static) if (items > 1)
  for (int64_t i = 0; i < items; ++i) {
    const Tile t = work.at(i);
    const T* w = wp + t.p0 * stride;
    const T* b = bias ? bias + t.col0 : nullptr;
    T* o = out + t.r0 * n + t.col0;
    if (t.two_panels)
      tile_rows<2, kSilu>(t.rows, x + t.r0 * k, k, w, b, o, n, t.cols);
    else
      tile_rows<1, false>(t.rows, x + t.r0 * k, k, w, b, o, n, t.cols);
  }
}

}  // namespace

// ---- C ABI ------------------------------------------------------------------------------------------

#define DG_GEMM(SUF, T)                                                                                 \
  DG_EXPORT void dg_pack_linear_##SUF(void* dst, const void* w, int64_t n, int64_t k) {                 \
    pack(static_cast<T*>(dst), static_cast<const T*>(w), n, k);                                         \
  }                                                                                                     \
  DG_EXPORT void dg_linear_##SUF(void* out, const void* x, const void* wp, const void* bias, int64_t m, \
                                 int64_t n, int64_t k) {                                                \
    linear<false>(static_cast<T*>(out), static_cast<const T*>(x), static_cast<const T*>(wp),            \
                  static_cast<const T*>(bias), m, n, k);                                                \
  }                                                                                                     \
  DG_EXPORT void dg_linear_silu_##SUF(void* out, const void* x, const void* wp, int64_t m,              \
                                      int64_t inter, int64_t k) {                                       \
    linear<true, T>(static_cast<T*>(out), static_cast<const T*>(x), static_cast<const T*>(wp), nullptr, \
                    m, inter, k);                                                                       \
  }
DG_BOTH(DG_GEMM)

// Whether the bfloat16 GEMM runs on AMX tiles here (built for a CPU with AMX, and Linux grants them).
DG_EXPORT int64_t dg_linear_bf16_amx() {
#if defined(DG_GEMM_AMX)
  return amx_permitted();
#else
  return 0;
#endif
}
