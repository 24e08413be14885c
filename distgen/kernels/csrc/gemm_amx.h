// The bfloat16 GEMM on CPUs with AMX (Sapphire Rapids and later Xeons): tdpbf16ps multiplies a 16-row x
// 32-k tile of x by a 32-k x 16-feature tile of the weights into 16 x 16 float32 sums, several times the
// multiply-adds per cycle of AVX-512-BF16's vdpbf16ps. Included by gemm.cpp after the helpers it uses
// (TileItems, store_tile, panel_stride), inside its namespace.
//
// The weights keep the layout every bfloat16 path packs: a panel's k pairs, [K/2][16][2], are 64-byte
// rows, which is the layout of tdpbf16ps's second operand, so a weight tile loads straight from the
// panel. x loads straight from its rows (a stride of K elements); rows past M in a last, short tile come
// from a zero-padded copy. Each output is its own row's sum over k in 32-k steps, in the same order for
// any M, so a row's result does not depend on its batch here either. K must be a multiple of 32 (the
// model shapes are); other K take the vdpbf16ps path.
// Where Linux withholds the tiles (amx.h), the vdpbf16ps path runs.
#pragma once

#if defined(DG_AMX)
#define DG_GEMM_AMX 1

constexpr int64_t kAmxRows = 32;        // rows per work item: two 16-row x tiles
constexpr int64_t kAmxBlockRows = 256;  // rows whose x stays in L2 while every panel passes (as kBlockRows)

inline bool amx_takes(int64_t k) { return k % 32 == 0 && k > 0 && amx_permitted(); }

// The tiles (amx.h's configuration): 0-3 the sums (16 rows x 16 floats) of x tile 0/1 by panel 0/1; 4-5
// two x tiles (16 rows x 32 bf16); 6-7 two weight tiles (16 k pairs x 16 features x 2).
// sums [32][32]: rows of x tiles 0 and 1 (a0, a1, each read with lda elements between rows) by panels 0
// and 1 (w, w + stride), over k in steps of 32.
template <int kRT, int kCT>
inline void amx_block(const bf16* a0, const bf16* a1, int64_t lda, const bf16* w, int64_t stride, int64_t k,
                      float (*sums)[32]) {
  _tile_zero(0);
  if constexpr (kCT == 2) _tile_zero(1);
  if constexpr (kRT == 2) _tile_zero(2);
  if constexpr (kRT == 2 && kCT == 2) _tile_zero(3);
  const int64_t lda_bytes = lda * 2;
  for (int64_t i = 0; i < k; i += 32) {
    _tile_loadd(4, a0 + i, lda_bytes);
    _tile_loadd(6, w + i * 16, 64);  // k pairs i/2 .. i/2 + 15 of panel 0: 16 rows of 32 bf16
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kCT == 2) {
      _tile_loadd(7, w + stride + i * 16, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (kRT == 2) {
      _tile_loadd(5, a1 + i, lda_bytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kCT == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, &sums[0][0], 128);
  if constexpr (kCT == 2) _tile_stored(1, &sums[0][16], 128);
  if constexpr (kRT == 2) _tile_stored(2, &sums[16][0], 128);
  if constexpr (kRT == 2 && kCT == 2) _tile_stored(3, &sums[16][16], 128);
}

template <bool kSilu>
void linear_amx(bf16* out, const bf16* x, const bf16* wp, const bf16* bias, int64_t m, int64_t n, int64_t k) {
  const TileItems<kSilu> work(m, n, kAmxRows, kAmxBlockRows);
  const int64_t stride = panel_stride<bf16>(k), items = work.items();
#pragma omp parallel if (items > 1)
  {
    amx_configure();
    std::vector<bf16> padded;  // a last tile's rows, zero past M (rows from padded_r0)
    int64_t padded_r0 = -1;
    alignas(64) float sums[32][32];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      const Tile t = work.at(i);
      const int64_t r0 = t.r0, rows = t.rows;
      const bf16* w = wp + t.p0 * stride;
      const bf16 *a = x + r0 * k, *a0 = a, *a1 = a + 16 * k;
      if (rows % 16) {  // the short tile from the zero-padded copy, made once per row tile
        const int64_t full = rows / 16 * 16;
        if (padded_r0 != r0) {
          padded.assign(16 * k, bf16{0});
          std::memcpy(padded.data(), a + full * k, (rows - full) * k * sizeof(bf16));
          padded_r0 = r0;
        }
        (full ? a1 : a0) = padded.data();
      }
      const bool two_rows = rows > 16, two_panels = t.two_panels;
      if (two_rows && two_panels) amx_block<2, 2>(a0, a1, k, w, stride, k, sums);
      else if (two_rows) amx_block<2, 1>(a0, a1, k, w, stride, k, sums);
      else if (two_panels) amx_block<1, 2>(a0, a1, k, w, stride, k, sums);
      else amx_block<1, 1>(a0, a1, k, w, stride, k, sums);
      const bf16* b = bias ? bias + t.col0 : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        bf16* o = out + (r0 + r) * n + t.col0;
        if (two_panels)
          store_tile<1, 2, kSilu>(*reinterpret_cast<const float(*)[1][2][16]>(&sums[r][0]), b, o, n, t.cols);
        else
          store_tile<1, 1, false>(*reinterpret_cast<const float(*)[1][1][16]>(&sums[r][0]), b, o, n, t.cols);
      }
    }
    _tile_release();
  }
}

#endif
