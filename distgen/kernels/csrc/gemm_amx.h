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
// Rows whose x stays in L2 while every panel passes (as kBlockRows): as many as fill about 576 KB (512 rows
// of k = 576), so that the weights stream from memory fewer times a product than with 256, where 512 rows
// of a larger k (1.5 MB at k = 1536) would crowd L2 and lose as much.
inline int64_t amx_block_rows(int64_t k) { return std::max<int64_t>(kAmxRows, 576 * 1024 / (2 * k) / kAmxRows * kAmxRows); }

inline bool amx_takes(int64_t k) { return k % 32 == 0 && k > 0 && amx_permitted(); }

// Each thread takes an even, contiguous share of the work items (TileItems) and pipelines them: the
// epilogue of item i - 1 (rounding, bias or SiLU, the stores: as much vector work as the tile products of
// a 576-k item) runs in slices between the k steps of item i, so the tile unit never waits for it. Two
// sum buffers alternate between the item computed and the item finished.
template <bool kSilu>
void linear_amx(bf16* out, const bf16* x, const bf16* wp, const bf16* bias, int64_t m, int64_t n, int64_t k) {
  const TileItems<kSilu> work(m, n, kAmxRows, amx_block_rows(k));
  const int64_t stride = panel_stride<bf16>(k), items = work.items();
#pragma omp parallel if (items > 1)
  {
    amx_configure();
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t begin = items * id / threads, end = items * (id + 1) / threads;
    std::vector<bf16> padded;  // a last tile's rows, zero past M (rows from padded_r0)
    int64_t padded_r0 = -1;
    alignas(64) float sums[2][32][32];
    auto finish = [&](const Tile& t, const float (*s)[32], int64_t r_lo, int64_t r_hi) {
      const bf16* b = bias ? bias + t.col0 : nullptr;
      for (int64_t r = r_lo; r < r_hi; ++r) {
        bf16* o = out + (t.r0 + r) * n + t.col0;
        if (t.two_panels)
          store_tile<1, 2, kSilu>(*reinterpret_cast<const float(*)[1][2][16]>(&s[r][0]), b, o, n, t.cols);
        else
          store_tile<1, 1, false>(*reinterpret_cast<const float(*)[1][1][16]>(&s[r][0]), b, o, n, t.cols);
      }
    };
    const int64_t steps = k / 32, first_step = std::min<int64_t>(2, steps - 1);  // sums of i - 1 stored by then
    Tile prev{};
    for (int64_t i = begin; i < end; ++i) {
      const Tile t = work.at(i);
      const bf16* w = wp + t.p0 * stride;
      const bf16 *a = x + t.r0 * k, *a0 = a, *a1 = a + 16 * k;
      if (t.rows % 16) {  // the short tile from the zero-padded copy, made once per row tile
        const int64_t full = t.rows / 16 * 16;
        if (padded_r0 != t.r0) {
          padded.assign(16 * k, bf16{0});
          std::memcpy(padded.data(), a + full * k, (t.rows - full) * k * sizeof(bf16));
          padded_r0 = t.r0;
        }
        (full ? a1 : a0) = padded.data();
      }
      const float(*last)[32] = sums[(i - 1) & 1];
      const int64_t per = (prev.rows + steps - first_step - 1) / (steps - first_step);
      auto slice = [&](int64_t s) {
        if (i == begin || s < first_step) return;
        const int64_t lo = (s - first_step) * per;
        finish(prev, last, std::min(lo, prev.rows), std::min(lo + per, prev.rows));
      };
      // A panel's tile rows are its k pairs (64 bytes), a k step 16 of them; the second panel is stride on.
      amx_product(t.rows > 16, t.two_panels, a0, a1, k * 2, w, 64, 16 * 64, stride * 2, k, sums[i & 1],
                  sizeof sums[0][0], slice);
      prev = t;
    }
    if (end > begin) finish(prev, sums[(end - 1) & 1], 0, prev.rows);
    _tile_release();
  }
}

#endif
