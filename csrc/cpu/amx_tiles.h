// A thin layer over the AMX tile instructions (header-only), real or
// emulated: the flash kernel's AMX engine (flash_amx.h), HiP's bf16 search
// (hip_score.cpp) and the AMX peak probe (probes.cpp) use it. Include it
// where the compiler targets AMX-TILE + AMX-BF16, or with -DLONGATTN_AMX_EMULATE, which asks for the
// scalar emulation of amx_emulate.h (any AVX512-BF16 build): it runs the same
// sequence of tile operations and checks each one.
//
// Linux gives a process AMX state only on request (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, kernel 5.16+); without it the
// first tile instruction dies with SIGILL. amx_ready() asks once per process.

#pragma once

#include <cstdint>

#ifdef LONGATTN_AMX_EMULATE
#include "amx_emulate.h"
#else
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// The intrinsics take tile numbers as literal constants (gcc pastes them into
// the instruction text), so the real layer is spelled out per tile register.
namespace amx {

// LDTILECFG's 64-byte operand (palette 1: tiles 0..7).
struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0, reserved0[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(Config) == 64, "LDTILECFG reads 64 bytes");

#ifdef LONGATTN_AMX_EMULATE
inline void configure(const Config& c) { amx_emu::tile_loadconfig(&c); }
inline void release() { amx_emu::tile_release(); }
template <int T> inline void zero() { amx_emu::tile_zero(T); }
template <int T> inline void load(const void* p, int64_t stride_bytes) { amx_emu::tile_loadd(T, p, stride_bytes); }
template <int T> inline void store(void* p, int64_t stride_bytes) { amx_emu::tile_stored(T, p, stride_bytes); }
template <int C, int A, int B> inline void dp_bf16() { amx_emu::tile_dpbf16ps(C, A, B); }
#else
// Not gcc's <amxtileintrin.h> intrinsics: gcc 12's tell the compiler that
// _tile_loadconfig reads 8 bytes of its 64 (the stores of rows and colsb
// were dropped as dead, and LDTILECFG faulted on a zero shape) and that
// _tile_loadd reads no memory at all (stores to the buffer it loads could
// be moved past it). These spell the instructions with what they really
// touch: LDTILECFG the whole Config, TILELOADD / TILESTORED memory (strided
// rows: a "memory" clobber rather than a precise operand).
inline void configure(const Config& c) {
  __asm__ volatile("{ldtilecfg\t%0|ldtilecfg\t%0}" ::"m"(c));
}
inline void release() { __asm__ volatile("tilerelease" ::: "memory"); }

template <int T> struct Tile;
#define LONGATTN_AMX_TILE(i)                                                                             \
  template <> struct Tile<i> {                                                                           \
    static void zero() { __asm__ volatile("tilezero\t%%tmm" #i ::); }                                    \
    static void load(const void* p, int64_t stride) {                                                    \
      __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm" #i "|tileloadd\t%%tmm" #i ", [%0+%1*1]}" ::"r"(p), \
                       "r"(stride)                                                                       \
                       : "memory");                                                                      \
    }                                                                                                    \
    static void store(void* p, int64_t stride) {                                                         \
      __asm__ volatile("{tilestored\t%%tmm" #i ", (%0,%1,1)|tilestored\t[%0+%1*1], %%tmm" #i "}" ::"r"(p), \
                       "r"(stride)                                                                       \
                       : "memory");                                                                      \
    }                                                                                                    \
  };
LONGATTN_AMX_TILE(0) LONGATTN_AMX_TILE(1) LONGATTN_AMX_TILE(2) LONGATTN_AMX_TILE(3)
LONGATTN_AMX_TILE(4) LONGATTN_AMX_TILE(5) LONGATTN_AMX_TILE(6) LONGATTN_AMX_TILE(7)
#undef LONGATTN_AMX_TILE
template <int T> inline void zero() { Tile<T>::zero(); }
template <int T> inline void load(const void* p, int64_t stride_bytes) { Tile<T>::load(p, stride_bytes); }
template <int T> inline void store(void* p, int64_t stride_bytes) { Tile<T>::store(p, stride_bytes); }

// The (C, A, B) register triples the engine uses; any other fails to compile.
template <int C, int A, int B> struct Dp;
#define LONGATTN_AMX_DP(c, a, b)                                                                          \
  template <> struct Dp<c, a, b> {                                                                        \
    static void run() {                                                                                   \
      __asm__ volatile("{tdpbf16ps\t%%tmm" #b ", %%tmm" #a ", %%tmm" #c "|tdpbf16ps\t%%tmm" #c ", %%tmm" #a \
                       ", %%tmm" #b "}" ::);                                                              \
    }                                                                                                     \
  };
LONGATTN_AMX_DP(0, 3, 4) LONGATTN_AMX_DP(1, 3, 5) LONGATTN_AMX_DP(2, 3, 6)
LONGATTN_AMX_DP(0, 4, 6) LONGATTN_AMX_DP(1, 4, 7) LONGATTN_AMX_DP(2, 5, 6) LONGATTN_AMX_DP(3, 5, 7)
LONGATTN_AMX_DP(0, 4, 5) LONGATTN_AMX_DP(1, 4, 6) LONGATTN_AMX_DP(2, 4, 5) LONGATTN_AMX_DP(3, 4, 6)
LONGATTN_AMX_DP(0, 7, 5) LONGATTN_AMX_DP(1, 7, 6) LONGATTN_AMX_DP(2, 7, 5) LONGATTN_AMX_DP(3, 7, 6)
#undef LONGATTN_AMX_DP
template <int C, int A, int B> inline void dp_bf16() { Dp<C, A, B>::run(); }
#endif

}  // namespace amx

// True once this process may use AMX state (asked once; the emulation needs no permission).
inline bool amx_ready() {
#ifdef LONGATTN_AMX_EMULATE
  return true;
#else
  static const bool ready = [] {
    constexpr long kArchReqXcompPerm = 0x1023;  // <asm/prctl.h> ARCH_REQ_XCOMP_PERM
    constexpr long kXfeatureXtiledata = 18;     // the AMX tile data state component
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
#endif
}

}  // namespace
