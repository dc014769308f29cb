// A scalar software emulation of the AMX tile instructions the flash kernel
// and HiP's bf16 search use (header-only; built with -DLONGATTN_AMX_EMULATE,
// see amx_tiles.h).
//
// Why: the AMX engine must be right on the Intel machines that have AMX,
// while most development machines lack it. The emulated build runs the
// engine's exact sequence of tile operations here, and checks on every
// operation what the hardware would fault on (#GP, #UD) or silently do
// differently (zeroed tails, DAZ/FTZ), aborting loudly on misuse instead of
// letting a wrong shape pass unnoticed.
//
// Semantics follow Intel's documentation (SDM vol. 2 entries LDTILECFG,
// TILELOADD, TILESTORED, TILEZERO, TILERELEASE, TDPBF16PS; the Intrinsics
// Guide's _tile_loadconfig, _tile_loadd, _tile_dpbf16ps), as read at
// felixcloutier.com/x86 and intel.com's intrinsics guide:
//   * LDTILECFG takes 64 bytes: byte 0 palette, byte 1 start_row, bytes 2-15
//     reserved (zero), bytes 16-31 colsb of tiles 0..7 (uint16), 32-47
//     reserved, bytes 48-55 rows of tiles 0..7, 56-63 reserved. Palette 0 is
//     the init state (tiles released and zeroed); palette 1 allows 8 tiles of
//     at most 16 rows x 64 bytes. Anything else, a nonzero reserved byte, or a
//     tile with rows xor colsb zero is #GP.
//   * TILELOADD reads rows x colsb bytes (row r at base + r * stride), zeroes
//     the rest of each row and the rows past `rows` (write_row_and_zero,
//     zero_upper_rows); TILESTORED writes rows x colsb bytes; both #UD
//     without a configuration or on an unconfigured tile.
//   * TDPBF16PS tC, tA, tB (C m x n fp32, A m x k bf16 pairs, B k x n bf16
//     pairs): #UD unless the three tiles differ, all are configured, colsb
//     are multiples of 4, C.colsb == B.colsb, A.rows == C.rows, A.colsb / 4
//     == B.rows, n <= 16, k <= 16. Per row m, the even and the odd bf16
//     products are accumulated over k in two float32 lanes by FMAs, then the
//     two lanes are added and the sum added to C[m][n] (the SDM pseudocode:
//     temp1.fp32[2n] / [2n+1], then tmpf32 := temp1[2n] + temp1[2n+1]).
//     "Round to nearest even" for each accumulation; input bf16 denormals are
//     treated as zero and output denormals flushed to zero; MXCSR is neither
//     consulted nor updated.
// The tile registers are per thread, as the hardware's are.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace amx_emu {

constexpr int kTiles = 8, kMaxRows = 16, kMaxColsb = 64;

struct State {
  bool configured = false;
  uint16_t colsb[kTiles] = {};
  uint8_t rows[kTiles] = {};
  alignas(64) uint8_t data[kTiles][kMaxRows][kMaxColsb] = {};
};

inline State& state() {
  static thread_local State s;
  return s;
}

[[noreturn]] inline void fail(const char* instruction, const char* what, int a = -1, int b = -1, int c = -1) {
  std::fprintf(stderr, "longattn AMX emulation: %s: %s (%d, %d, %d); the hardware would fault here\n", instruction,
               what, a, b, c);
  std::fflush(stderr);
  std::abort();
}

inline void clear(State& s) {
  s.configured = false;
  std::memset(s.colsb, 0, sizeof s.colsb);
  std::memset(s.rows, 0, sizeof s.rows);
  std::memset(s.data, 0, sizeof s.data);
}

// The tile must exist and be configured (rows and colsb nonzero) with colsb a multiple of 4.
inline void check_tile(const char* instruction, int t) {
  const State& s = state();
  if (!s.configured) fail(instruction, "tiles are not configured (no LDTILECFG on this thread)", t);
  if (t < 0 || t >= kTiles) fail(instruction, "no such tile register", t);
  if (s.rows[t] == 0) fail(instruction, "the tile is not configured (0 rows)", t);
  if (s.colsb[t] % 4 != 0) fail(instruction, "colsb is not a multiple of 4", t, s.colsb[t]);
}

inline void tile_loadconfig(const void* config) {
  uint8_t cfg[64];
  std::memcpy(cfg, config, sizeof cfg);
  State& s = state();
  if (cfg[0] == 0) {  // the init state
    clear(s);
    return;
  }
  if (cfg[0] != 1) fail("LDTILECFG", "unsupported palette", cfg[0]);
  if (cfg[1] != 0) fail("LDTILECFG", "start_row must be 0 outside an interrupted load", cfg[1]);
  for (int i = 2; i < 16; ++i)
    if (cfg[i] != 0) fail("LDTILECFG", "reserved byte 2..15 is not zero", i, cfg[i]);
  for (int i = 32; i < 48; ++i)
    if (cfg[i] != 0) fail("LDTILECFG", "reserved byte 32..47 (colsb of tiles 8..15) is not zero", i, cfg[i]);
  for (int i = 56; i < 64; ++i)
    if (cfg[i] != 0) fail("LDTILECFG", "reserved byte 56..63 (rows of tiles 8..15) is not zero", i, cfg[i]);
  uint16_t colsb[kTiles];
  uint8_t rows[kTiles];
  for (int t = 0; t < kTiles; ++t) {
    std::memcpy(&colsb[t], cfg + 16 + 2 * t, 2);
    rows[t] = cfg[48 + t];
    if (rows[t] > kMaxRows) fail("LDTILECFG", "more than 16 rows", t, rows[t]);
    if (colsb[t] > kMaxColsb) fail("LDTILECFG", "more than 64 bytes per row", t, colsb[t]);
    if ((rows[t] == 0) != (colsb[t] == 0)) fail("LDTILECFG", "rows or colsb zero but not both", t, rows[t], colsb[t]);
  }
  clear(s);
  s.configured = true;
  std::memcpy(s.colsb, colsb, sizeof colsb);
  std::memcpy(s.rows, rows, sizeof rows);
}

inline void tile_release() { clear(state()); }

inline void tile_zero(int t) {
  check_tile("TILEZERO", t);
  std::memset(state().data[t], 0, sizeof state().data[t]);
}

// Reads exactly rows x colsb bytes (nothing past colsb of a row).
inline void tile_loadd(int t, const void* base, int64_t stride) {
  check_tile("TILELOADD", t);
  State& s = state();
  std::memset(s.data[t], 0, sizeof s.data[t]);  // the tails past colsb and past rows read as zero
  for (int r = 0; r < s.rows[t]; ++r)
    std::memcpy(s.data[t][r], static_cast<const uint8_t*>(base) + r * stride, s.colsb[t]);
}

inline void tile_stored(int t, void* base, int64_t stride) {
  check_tile("TILESTORED", t);
  const State& s = state();
  for (int r = 0; r < s.rows[t]; ++r) std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.data[t][r], s.colsb[t]);
}

// bf16 bits -> float32, denormals as (signed) zero.
inline float bf16_daz(uint16_t bits) {
  const uint32_t w = static_cast<uint32_t>((bits & 0x7f80u) == 0 ? bits & 0x8000u : bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

// Output denormals flushed to (signed) zero.
inline float ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }

inline void tile_dpbf16ps(int c, int a, int b) {
  const char* op = "TDPBF16PS";
  if (c == a || c == b || a == b) fail(op, "the three tiles must differ", c, a, b);
  check_tile(op, c);
  check_tile(op, a);
  check_tile(op, b);
  State& s = state();
  const int m_rows = s.rows[c], n = s.colsb[c] / 4, k = s.colsb[a] / 4;
  if (s.colsb[b] != s.colsb[c]) fail(op, "B.colsb != C.colsb", s.colsb[b], s.colsb[c]);
  if (s.rows[a] != s.rows[c]) fail(op, "A.rows != C.rows", s.rows[a], s.rows[c]);
  if (s.rows[b] != k) fail(op, "A.colsb / 4 != B.rows", s.colsb[a], s.rows[b]);
  if (n > 16 || k > 16) fail(op, "n or k above 16", n, k);
  for (int m = 0; m < m_rows; ++m) {
    float even[16] = {}, odd[16] = {};
    for (int kk = 0; kk < k; ++kk) {
      uint16_t arow[2], brow[32];
      std::memcpy(arow, s.data[a][m] + 4 * kk, 4);
      std::memcpy(brow, s.data[b][kk], 4 * n);
      for (int j = 0; j < n; ++j) {
        // fmaf: one rounding of the exact product plus the lane, as the hardware's FMA.
        even[j] = ftz(std::fmaf(bf16_daz(arow[0]), bf16_daz(brow[2 * j]), even[j]));
        odd[j] = ftz(std::fmaf(bf16_daz(arow[1]), bf16_daz(brow[2 * j + 1]), odd[j]));
      }
    }
    float* crow = reinterpret_cast<float*>(s.data[c][m]);
    for (int j = 0; j < n; ++j) {
      float acc;
      std::memcpy(&acc, crow + j, sizeof acc);
      acc = ftz(acc + ftz(even[j] + odd[j]));
      std::memcpy(crow + j, &acc, sizeof acc);
    }
    std::memset(s.data[c][m] + 4 * n, 0, kMaxColsb - 4 * n);  // write_row_and_zero
  }
  for (int m = m_rows; m < kMaxRows; ++m) std::memset(s.data[c][m], 0, kMaxColsb);  // zero_upper_rows
}

}  // namespace amx_emu
