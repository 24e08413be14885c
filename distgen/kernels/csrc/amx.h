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

}  // namespace dg

#endif
