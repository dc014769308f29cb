// The flash kernel's AMX engine: bfloat16 Q K^T and P V through AMX tiles
// (TDPBF16PS), float32 softmax and accumulators. Included by flash_cpu.cpp
// (at file scope, after its bf16 helpers) when LONGATTN_AMX is defined: the
// compiler targets AMX-TILE + AMX-BF16, or -DLONGATTN_AMX_EMULATE asks for
// the scalar emulation of amx_emulate.h (any AVX512-BF16 build), which runs
// the same sequence of tile operations and checks each one.
//
// The engine (interface: flash_tiles.h) keeps the bf16-dot engine's layouts,
// which are what the tiles want, so nothing is transposed but P:
//   * scores, key-major as online_softmax wants them: C[key][row] (16 keys x
//     16 rows fp32) += A (16 K rows x 32 head dims, bf16) x B (q pair words
//     qt2[(d/2) * BM + row], 16 pairs x 16 rows: AMX's pair-interleaved B
//     layout as it stands, stride BM words). q stays unscaled (exact bf16).
//   * P V: C = 16 rows x 16 head dims fp32 of o itself, four at a time,
//     loaded from o, summing the tile's k steps (32 keys each), stored back;
//     the rows whose running max moved are first rescaled by a vector pass
//     (a tile load of what vector stores just wrote waits for them, so only
//     those rows pay that). A = P rounded to bf16, row-major (16
//     rows x 32 keys, keys past n zero), transposed from the key-major
//     softmax output in registers; B = V key-pair words vp[t][d] = (v[2t][d],
//     v[2t+1][d]) (16 pairs x 16 head dims), built by pair_values once per
//     tile and work item (SharedTile: the item's blocks reuse them).
// Head dims are padded to 32 for the scores (zeros in q and K add exactly
// nothing; K is read in place when its head dim needs no padding and a key
// group is 16 consecutive positions, else copied); P V needs only the
// caller's multiple of 16. The softmax scale is applied as the softmax reads
// the scores (one pass less), except with softcap. Every tile is 16 rows
// x 64 bytes, so one configuration (palette 1) serves the whole engine: it is
// loaded when an engine is made (a thread's engines, one per block of a work
// item, load the same one, once per parallel region) and released when they go.
//
// Error: as the bf16-dot engine, P is rounded to bf16 (relative error <= 2^-9
// per weight, independent across keys) while the row sums l use the float32
// P; products of bf16 inputs are exact in float32, so Q K^T loses only the
// float32 sums' rounding.
//
// Linux gives a process AMX state only on request (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, kernel 5.16+); without it the
// first tile instruction dies with SIGILL. amx_ready() asks once per process;
// longattn_flash_cpu_amx_ready() tells Python, which offers "amx" only when it is 1.

#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "flash_tiles.h"

namespace {

constexpr int kTileRows = 16;  // rows of every tile: 16 fp32 or 32 bf16 (64 bytes) each
static_assert(BM % kTileRows == 0 && BN % 32 == 0, "the tiles cut BM rows and BN keys evenly");
static_assert(kTileRows == W, "a row group of the tiles is a row vector of RowState (nq counts both)");

// One pair of V rows as words dst[p] = (v0[d], v1[d]), the head dims of each
// block of 32 in the order one unpacklo and one unpackhi leave them (column p
// holds dim 8 (p % 16 / 4) + 4 (p / 16) + p % 4: half the instructions of
// widening each half in order); a last 16 dims in order.
inline void pair_rows_unpacked(const uint16_t* v0, const uint16_t* v1, int headdim, uint32_t* dst) {
  int d = 0;
  for (; d + 32 <= headdim; d += 32) {
    const __m512i a = _mm512_loadu_si512(v0 + d), b = _mm512_loadu_si512(v1 + d);
    _mm512_storeu_si512(dst + d, _mm512_unpacklo_epi16(a, b));
    _mm512_storeu_si512(dst + d + 16, _mm512_unpackhi_epi16(a, b));
  }
  if (d < headdim) pair_rows_in_order(v0 + d, v1 + d, headdim - d, dst + d);
}

// w[i] lane j -> w[j] lane i for 16 vectors of 16 32-bit words (in registers).
inline void transpose_16x16_words(__m512i w[16]) {
  __m512i a[16];
  for (int i = 0; i < 16; i += 2) {  // 2 x 2 blocks of words
    a[i] = _mm512_unpacklo_epi32(w[i], w[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(w[i], w[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks
    w[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    w[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    w[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    w[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  // rows i..i+3 now hold, per 128-bit lane L, the 4 x 4 block (rows i.., columns 4L..4L+3) transposed
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes across groups of 4 rows
    a[i] = _mm512_shuffle_i32x4(w[i], w[i + 4], 0x88);        // lanes 0, 2 of each
    a[i + 4] = _mm512_shuffle_i32x4(w[i], w[i + 4], 0xdd);    // lanes 1, 3
    a[i + 8] = _mm512_shuffle_i32x4(w[i + 8], w[i + 12], 0x88);
    a[i + 12] = _mm512_shuffle_i32x4(w[i + 8], w[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    w[i] = _mm512_shuffle_i32x4(a[i], a[i + 8], 0x88);
    w[i + 8] = _mm512_shuffle_i32x4(a[i], a[i + 8], 0xdd);
    w[i + 4] = _mm512_shuffle_i32x4(a[i + 4], a[i + 12], 0x88);
    w[i + 12] = _mm512_shuffle_i32x4(a[i + 4], a[i + 12], 0xdd);
  }
}

// bf16 inputs (uint16_t bits), AMX tile products, float32 softmax and accumulators.
struct AmxEngine : RowState {
  int headdim, d32;            // head dim; padded to 32 for the scores' k steps
  std::vector<uint32_t> qt2;   // (d32/2, BM) q words (head-dim pairs), zero past headdim
  std::vector<uint16_t> kt;    // (BN, d32) K rows copied where not read in place (see score), zero past n
  std::vector<uint16_t> prow;  // (BM, BN) P rounded to bf16, row-major, zero past n
  SharedTile* vp;  // (BN/2, headdim) V key-pair words, zero past the tile's pairs; shared by the item's blocks
  std::vector<uint16_t> zero_row;

  AmxEngine(int hd, SharedTile* shared)
      : RowState(hd), headdim(hd), d32((hd + 31) / 32 * 32), qt2(static_cast<size_t>(d32 / 2) * BM, 0u),
        kt(static_cast<size_t>(BN) * d32, 0), prow(static_cast<size_t>(BM) * BN, 0), vp(shared), zero_row(hd, 0) {
    vp->words.resize(static_cast<size_t>(BN / 2) * hd);
    if (!amx_ready()) {  // Python never asks for AMX then (longattn_flash_cpu_amx_ready): a bug if reached
      std::fprintf(stderr, "longattn: the AMX engine ran without the OS's permission for AMX state\n");
      std::abort();
    }
    amx::Config config;
    for (int t = 0; t < 8; ++t) {
      config.rows[t] = kTileRows;
      config.colsb[t] = 64;
    }
    amx::configure(config);
  }
  ~AmxEngine() { amx::release(); }
  AmxEngine(const AmxEngine&) = delete;
  AmxEngine& operator=(const AmxEngine&) = delete;

  // A block of fewer than BM rows (the 16-row piece a block_q = 64 listing
  // leaves after a 48-row one, a sequence's last rows) computes only its row
  // groups of 16 (nq, RowState::reset): the piece of HiP's 64-row blocks then
  // costs a third of a full block, not a whole one. Each row's result is the
  // same bits either way (rows never mix).
  void begin(const Problem& pb, const Seq& sq, int h, int first_row, int rows) {
    for (int r = 0; r < BM; ++r) {
      const uint16_t* qrow = query_row<uint16_t>(pb, sq, h, first_row, r, rows);
      for (int t = 0; t < headdim / 2; ++t) qt2[t * BM + r] = r < rows ? load_word(qrow + 2 * t) : 0u;
    }
    reset(rows);
  }

  void tile(const Problem& pb, const Seq& sq, int kv_head, const int64_t* keys, const uint8_t* listed, int n,
            int rows, int64_t p0, bool needs_mask) {
    (void)rows;  // the block's row groups (nq) were set by begin; padding rows within them are computed, never written
    const uint16_t* k_base = head_rows<uint16_t>(sq.k, pb.k_sh, kv_head);
    const uint16_t* v_base = head_rows<uint16_t>(sq.v, pb.v_sh, kv_head);
    const int n_scored = (n + kTileRows - 1) / kTileRows * kTileRows;  // whole key groups of 16
    score(pb, k_base, keys, n, n_scored);
    // The softmax scale is folded into the softmax's reads (one pass less);
    // softcap needs the scaled scores first, and a scale <= 0 does not commute with max.
    float score_scale = pb.scale;
    if (pb.softcap > 0 || !(pb.scale > 0)) {
      const __m512 scale = _mm512_set1_ps(pb.scale);
      for (int i = 0; i < n_scored * BM; i += W)
        _mm512_storeu_ps(st.data() + i, _mm512_mul_ps(_mm512_loadu_ps(st.data() + i), scale));
      score_scale = 1.0f;
    }
    online_softmax(pb, st.data(), keys, listed, n, n_scored, p0, needs_mask, m.data(), l.data(), alpha.data(), nq,
                   score_scale);
    const int steps = (n + 31) / 32;  // P V k steps of 32 keys (16 pairs)
    if (!vp->holds(v_base, keys, n)) {
      const int pairs = pair_values(v_base, pb.v_ss, keys, n);
      std::memset(vp->words.data() + static_cast<size_t>(pairs) * headdim, 0,
                  sizeof(uint32_t) * static_cast<size_t>(steps * 16 - pairs) * headdim);
      vp->hold(v_base, keys, n);
    }
    transpose_probabilities(n, steps);
    accumulate_values(steps);
  }

  // st[key][row] = sum_d K[key][d] q[row][d] (unscaled) for key < n_scored:
  // per key group of 16, C tiles 0..2 = the three row groups, A = tile 3 (16
  // K rows x 32 head dims), B = tiles 4..6 (q words). A group of 16
  // consecutive keys, all real, is read in place (row stride k_ss) when the
  // head dim fills whole k steps; others are copied to kt (zero past n: finite
  // scores, masked by the softmax).
  void score(const Problem& pb, const uint16_t* k_base, const int64_t* keys, int n, int n_scored) {
    const int64_t q_stride = BM * sizeof(uint32_t);
    for (int g = 0; g < n_scored / kTileRows; ++g) {
      const int j0 = g * kTileRows;
      const uint16_t* a;
      int64_t a_stride;
      if (d32 == headdim && j0 + kTileRows <= n && consecutive(keys + j0)) {
        a = k_base + keys[j0] * pb.k_ss;
        a_stride = pb.k_ss * static_cast<int64_t>(sizeof(uint16_t));
      } else {
        for (int j = j0; j < j0 + kTileRows; ++j) {
          uint16_t* dst = kt.data() + static_cast<size_t>(j) * d32;
          if (j < n) std::memcpy(dst, k_base + keys[j] * pb.k_ss, sizeof(uint16_t) * headdim);
          else std::memset(dst, 0, sizeof(uint16_t) * headdim);
        }
        a = kt.data() + static_cast<size_t>(j0) * d32;
        a_stride = d32 * static_cast<int64_t>(sizeof(uint16_t));
      }
      amx::zero<0>();
      if (nq > 1) amx::zero<1>();
      if (nq > 2) amx::zero<2>();
      for (int s = 0; s < d32 / 32; ++s) {
        amx::load<3>(a + s * 32, a_stride);
        const uint32_t* qs = qt2.data() + static_cast<size_t>(s * 16) * BM;
        amx::load<4>(qs, q_stride);
        amx::dp_bf16<0, 3, 4>();
        if (nq > 1) {
          amx::load<5>(qs + kTileRows, q_stride);
          amx::dp_bf16<1, 3, 5>();
        }
        if (nq > 2) {
          amx::load<6>(qs + 2 * kTileRows, q_stride);
          amx::dp_bf16<2, 3, 6>();
        }
      }
      float* sg = st.data() + static_cast<size_t>(j0) * BM;
      amx::store<0>(sg, q_stride);
      if (nq > 1) amx::store<1>(sg + kTileRows, q_stride);
      if (nq > 2) amx::store<2>(sg + 2 * kTileRows, q_stride);
    }
  }

  // vp[t][.] = V rows keys[2t], keys[2t+1] as pair words in pair_rows_unpacked's
  // order (o's columns come out in it too: finish() puts them back).
  int pair_values(const uint16_t* v_base, int64_t v_ss, const int64_t* keys, int n) {
    return interleave_value_pairs(v_base, v_ss, keys, n, headdim, zero_row.data(), vp->words.data(),
                                  pair_rows_unpacked);
  }

  void finish(const Problem& pb, const Seq& sq, int h, int first_row, int rows) {
    // o's 32-dim blocks in pair_values' column order -> head-dim order
    const __m512i lo = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i hi = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    for (int r = 0; r < rows; ++r) {
      float* orow = o.data() + static_cast<size_t>(r) * headdim;
      for (int d = 0; d + 32 <= headdim; d += 32) {
        const __m512 x0 = _mm512_loadu_ps(orow + d), x1 = _mm512_loadu_ps(orow + d + 16);
        _mm512_storeu_ps(orow + d, _mm512_permutex2var_ps(x0, lo, x1));
        _mm512_storeu_ps(orow + d + 16, _mm512_permutex2var_ps(x0, hi, x1));
      }
    }
    RowState::finish(pb, sq, h, first_row, rows);
  }

  // keys[0..16) are 16 consecutive positions (listed keys past the window come in any order).
  static bool consecutive(const int64_t* keys) {
    for (int j = 1; j < kTileRows; ++j)
      if (keys[j] != keys[0] + j) return false;
    return true;
  }

  // prow[row][key] = bf16(P), row-major for the P V tiles, from the key-major
  // st: keys 2t, 2t+1 of 16 rows become 16 pair words (one vector), and
  // 16 such vectors transpose (16 x 16 words, in registers) into 16 rows of
  // 32 keys. Keys past n read as 0 (the softmax zeroed them up to n_scored;
  // the rest of a k step is zeroed here).
  void transpose_probabilities(int n, int steps) {
    const __m512i pair_up = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                             6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int g = 0; g < nq; ++g)
      for (int s = 0; s < steps; ++s) {
        __m512i w[16];
        for (int t = 0; t < 16; ++t) {
          const int j = s * 32 + 2 * t;
          const __m512 lo = j < n ? _mm512_loadu_ps(st.data() + static_cast<size_t>(j) * BM + g * kTileRows)
                                  : _mm512_setzero_ps();
          const __m512 hi = j + 1 < n ? _mm512_loadu_ps(st.data() + static_cast<size_t>(j + 1) * BM + g * kTileRows)
                                      : _mm512_setzero_ps();
          // bf16 of lo in words 0..15, of hi in 16..31, then paired per row: (lo[r], hi[r])
          w[t] = _mm512_permutexvar_epi16(pair_up, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
        transpose_16x16_words(w);
        uint16_t* dst = prow.data() + static_cast<size_t>(g * kTileRows) * BN + s * 32;
        for (int r = 0; r < kTileRows; ++r) _mm512_storeu_si512(dst + static_cast<size_t>(r) * BN, w[r]);
      }
  }

  // o[row] = alpha[row] * o[row] + (P V)[row], per row group: first the
  // vector pass o[row] *= alpha[row] for the rows whose running max moved
  // (alpha != 1; after a row's first tiles that is seldom: a tile's keys
  // rarely beat every key before them), then per 64 head dims C = tiles 0..3
  // (16 dims each) loaded from o, summing all k steps of the tile into it,
  // stored back: o goes through the tiles, with no pass of vector adds of a
  // separate P V. A = P of the k step (tiles 4 and 7 by turns, so the next
  // step's load need not wait for this step's products), B = V (tiles 5, 6 by turns).
  void accumulate_values(int steps) {
    const int64_t p_stride = BN * sizeof(uint16_t), v_stride = headdim * sizeof(uint32_t);
    const int64_t o_stride = headdim * static_cast<int64_t>(sizeof(float));
    for (int g = 0; g < nq; ++g) {
      for (int r = g * kTileRows; r < (g + 1) * kTileRows; ++r) {
        if (alpha[r] == 1.0f) continue;
        const __m512 a = _mm512_set1_ps(alpha[r]);
        float* orow = o.data() + static_cast<size_t>(r) * headdim;
        for (int d = 0; d < headdim; d += kTileRows)
          _mm512_storeu_ps(orow + d, _mm512_mul_ps(a, _mm512_loadu_ps(orow + d)));
      }
      const uint16_t* pg = prow.data() + static_cast<size_t>(g * kTileRows) * BN;
      for (int d0 = 0; d0 < headdim; d0 += 64) {
        const int nd = std::min(4, (headdim - d0) / kTileRows);
        float* og = o.data() + static_cast<size_t>(g * kTileRows) * headdim + d0;
        amx::load<0>(og, o_stride);
        if (nd > 1) amx::load<1>(og + kTileRows, o_stride);
        if (nd > 2) amx::load<2>(og + 2 * kTileRows, o_stride);
        if (nd > 3) amx::load<3>(og + 3 * kTileRows, o_stride);
        for (int s = 0; s < steps; ++s) {
          const uint32_t* vs = vp->words.data() + static_cast<size_t>(s * 16) * headdim + d0;
          if (s & 1) values_step<7>(nd, pg + s * 32, p_stride, vs, v_stride);
          else values_step<4>(nd, pg + s * 32, p_stride, vs, v_stride);
        }
        amx::store<0>(og, o_stride);
        if (nd > 1) amx::store<1>(og + kTileRows, o_stride);
        if (nd > 2) amx::store<2>(og + 2 * kTileRows, o_stride);
        if (nd > 3) amx::store<3>(og + 3 * kTileRows, o_stride);
      }
    }
  }

  // C tiles 0..nd-1 += P (16 rows x 32 keys, into tile A) x V (32 keys x 16 dims each).
  template <int A>
  static void values_step(int nd, const uint16_t* p, int64_t p_stride, const uint32_t* vs, int64_t v_stride) {
    amx::load<A>(p, p_stride);
    amx::load<5>(vs, v_stride);
    amx::dp_bf16<0, A, 5>();
    if (nd > 1) {
      amx::load<6>(vs + 16, v_stride);
      amx::dp_bf16<1, A, 6>();
    }
    if (nd > 2) {
      amx::load<5>(vs + 32, v_stride);
      amx::dp_bf16<2, A, 5>();
    }
    if (nd > 3) {
      amx::load<6>(vs + 48, v_stride);
      amx::dp_bf16<3, A, 6>();
    }
  }
};

}  // namespace

// 1 when this build has the AMX engine and the OS granted this process AMX
// state (always, for the emulation), else 0: Python offers math "amx" only then.
extern "C" int longattn_flash_cpu_amx_ready() { return amx_ready() ? 1 : 0; }

#ifdef LONGATTN_AMX_EMULATE
// For the tests: one use of the emulated tiles. Case 0 is correct use: a
// 2 x 3 (x 2 pairs) product whose expected values, worked out by hand from
// the spec, need the even/odd lanes, DAZ of a bf16 denormal input and FTZ of
// a denormal product; returns 0 when the emulation matches, else the number
// of the failed check. Cases 1..9 are misuses the hardware faults on: each
// must abort the process with a message naming it.
extern "C" int longattn_amx_emulate_check(int which) {
  amx::Config c;
  c.rows[0] = 2; c.colsb[0] = 12;  // C: 2 x 3 fp32
  c.rows[1] = 2; c.colsb[1] = 8;   // A: 2 rows x 2 bf16 pairs
  c.rows[2] = 2; c.colsb[2] = 12;  // B: 2 pair rows x 3 columns
  switch (which) {
    case 1: c.colsb[1] = 12; break;     // A.colsb / 4 != B.rows
    case 2: c.rows[3] = 17; c.colsb[3] = 64; break;  // more than 16 rows
    case 3: c.rows[3] = 16; c.colsb[3] = 68; break;  // more than 64 bytes per row
    case 6: c.colsb[2] = 16; break;     // B.colsb != C.colsb
    case 7: c.rows[0] = 3; break;       // A.rows != C.rows
    case 8: c.reserved0[3] = 1; break;  // a reserved byte set
    default: break;                     // 4: load before LDTILECFG; 5: one tile twice; 9: use after release
  }
  constexpr uint16_t k1 = 0x3f80, k2 = 0x4000, k3 = 0x4040, kBig = 0x7180 /* 2^100 */, kTiny = 0x0d80 /* 2^-100 */,
                     kSmall = 0x3080 /* 2^-30 */, kDenormal = 0x0001;
  const uint16_t a[2][4] = {{k1, k2, k3, k1}, {kDenormal, 0, kTiny, 0}};   // row m: pairs k = 0, 1
  const uint16_t b[2][6] = {{kBig, k1, k1, k1, k2, k1}, {k1, k2, kSmall, k2, k1, k2}};  // pair row k: columns n = 0..2
  const float cin[2][3] = {{1, 2, 3}, {0, 0, 0}};
  // Row 0: even lane 1*B[0][2n] + 3*B[1][2n], odd lane 2*B[0][2n+1] + 1*B[1][2n+1] = 4, then + C.
  //   n=0: 2^100; n=1: even 1 + 3*2^-30 rounds to 1, so 1 + 4 + 2 = 7; n=2: 5 + 4 + 3 = 12.
  // Row 1: the denormal reads as 0 (DAZ); n=1's 2^-100 * 2^-30 = 2^-130 is flushed (FTZ); n=0, 2: 2^-100.
  const float want[2][3] = {{0x1p100f, 7.0f, 12.0f}, {0x1p-100f, 0.0f, 0x1p-100f}};
  float cout[4][4];
  std::memset(cout, 0xff, sizeof cout);
  if (which == 4) amx::load<0>(cin, sizeof cin[0]);
  amx::configure(c);
  if (which == 9) {
    amx::release();
    amx::zero<0>();
  }
  amx::load<0>(cin, sizeof cin[0]);
  amx::load<1>(a, sizeof a[0]);
  amx::load<2>(b, sizeof b[0]);
  if (which == 5) amx::dp_bf16<0, 1, 1>();
  amx::dp_bf16<0, 1, 2>();
  amx::store<0>(cout, sizeof cout[0]);
  amx::release();
  for (int m = 0; m < 2; ++m)
    for (int n = 0; n < 3; ++n)
      if (std::memcmp(&cout[m][n], &want[m][n], sizeof(float)) != 0) return 1 + m * 3 + n;
  uint32_t untouched;  // TILESTORED writes rows x colsb bytes and nothing past them
  std::memcpy(&untouched, &cout[0][3], sizeof untouched);
  if (untouched != 0xffffffffu) return 10;
  std::memcpy(&untouched, &cout[2][0], sizeof untouched);
  if (untouched != 0xffffffffu) return 11;
  return which == 0 ? 0 : 100 + which;  // a misuse that did not abort
}
#endif
