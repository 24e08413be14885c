// AMX basics shared by the GEMM (gemm_amx.h) and the bfloat16 prefill attention (attention_dpbf16.h).
// Linux grants a process the AMX register state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); where
// it refuses, the callers take their AVX-512-BF16 paths. Every kernel that uses tiles loads the one
// configuration below first: eight tiles of 16 rows x 64 bytes.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define DG_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace dg {

inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

inline void amx_configure() {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg = {};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

// The tile product every AMX kernel here is built from: for kRT <= 2 row tiles of x (16 rows x 32 bf16
// each) and kCT <= 2 column tiles of y (16 k pairs x 16 columns x 2 bf16), sum[r][c] = x_r y_c over k
// in steps of 32. Up to four independent sums keep tdpbf16ps busy (a product waits only on its own
// sum's last one, where one sum would wait out each product's whole latency), and each tile loaded feeds
// up to two products. Tiles 0-3 hold the sums, 4-5 x, 6-7 y.
// Strides in bytes: x rows lda apart, row tile 1 at a1; y's tile rows (k pairs) ldy apart, the next k
// step y_step further and column tile 1 y_next further; sum[r][c] is stored at out + r * 16 * ldo +
// c * 64, its rows ldo apart.
// after_step(s) runs after the products of k step s are issued: vector work placed there (the previous
// block's epilogue) runs while the tile unit computes, where after the block it would leave the unit idle.
struct NoSteps {
  void operator()(int64_t) const {}
};
template <int kRT, int kCT, typename Steps = NoSteps>
inline void amx_block(const void* a0, const void* a1, int64_t lda, const void* y, int64_t ldy, int64_t y_step,
                      int64_t y_next, int64_t k, void* out, int64_t ldo, Steps&& after_step = {}) {
  const char *x0 = static_cast<const char*>(a0), *x1 = static_cast<const char*>(a1);
  const char* yb = static_cast<const char*>(y);
  _tile_zero(0);
  if constexpr (kCT == 2) _tile_zero(1);
  if constexpr (kRT == 2) _tile_zero(2);
  if constexpr (kRT == 2 && kCT == 2) _tile_zero(3);
  for (int64_t i = 0; i < k; i += 32, yb += y_step) {
    _tile_loadd(4, x0 + i * 2, lda);
    _tile_loadd(6, yb, ldy);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kCT == 2) {
      _tile_loadd(7, yb + y_next, ldy);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (kRT == 2) {
      _tile_loadd(5, x1 + i * 2, lda);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kCT == 2) _tile_dpbf16ps(3, 5, 7);
    }
    after_step(i / 32);
  }
  char* o = static_cast<char*>(out);
  _tile_stored(0, o, ldo);
  if constexpr (kCT == 2) _tile_stored(1, o + 64, ldo);
  if constexpr (kRT == 2) _tile_stored(2, o + 16 * ldo, ldo);
  if constexpr (kRT == 2 && kCT == 2) _tile_stored(3, o + 16 * ldo + 64, ldo);
}

// amx_block with its tile counts chosen at run time.
template <typename Steps = NoSteps>
inline void amx_product(bool two_rows, bool two_cols, const void* a0, const void* a1, int64_t lda, const void* y,
                        int64_t ldy, int64_t y_step, int64_t y_next, int64_t k, void* out, int64_t ldo,
                        Steps&& after_step = {}) {
  if (two_rows && two_cols)
    amx_block<2, 2>(a0, a1, lda, y, ldy, y_step, y_next, k, out, ldo, after_step);
  else if (two_rows)
    amx_block<2, 1>(a0, a1, lda, y, ldy, y_step, y_next, k, out, ldo, after_step);
  else if (two_cols)
    amx_block<1, 2>(a0, a1, lda, y, ldy, y_step, y_next, k, out, ldo, after_step);
  else
    amx_block<1, 1>(a0, a1, lda, y, ldy, y_step, y_next, k, out, ldo, after_step);
}

}  // namespace dg

#endif
