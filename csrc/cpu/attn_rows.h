// Row micro-kernels shared by the CPU decode kernels (header-only): the
// streaming machinery of decode_streamk.cpp, also used by gather_decode.cpp.
//
// A "chunk" is up to n K/V rows given by pointers (krow/vrow), so callers
// choose the rows: consecutive cache positions (stream-K decode) or listed
// positions anywhere in a contiguous or paged cache (gather decode). Q rows
// are float32 (already scaled), scores and the online softmax are float32;
// with AVX2 the K/V rows are read in their own dtype and fp16/bf16 are
// widened in registers, without it the caller widens them first.
//
// With AVX2 there are also lane-per-key micro-kernels (qk4_block,
// pv_lanes_block, ReduceKeys, Prefetcher; with AVX512-BF16 qk4_block_bf16dot
// and pv16_bf16dot_block): one key per vector lane, 16 keys per chunk with
// AVX-512 and 8 with AVX2, used by the stream-K decode kernel's fast path
// (decode_streamk.cpp), which walks each chunk in the cache's address order.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "simd.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum DType { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline float bf16_to_f32(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Widen one row of `n` elements to float32.
inline void load_row(const void* src, int dtype, float* dst, int n) {
  if (dtype == kF32) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else if (dtype == kBF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int d = 0; d < n; ++d) dst[d] = bf16_to_f32(s[d]);
  } else {
    const _Float16* s = static_cast<const _Float16*>(src);
#pragma omp simd
    for (int d = 0; d < n; ++d) dst[d] = static_cast<float>(s[d]);
  }
}

inline void store_row(const float* src, int dtype, void* dst, int n) {
  if (dtype == kF32) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else if (dtype == kBF16) {
    uint16_t* t = static_cast<uint16_t*>(dst);
    for (int d = 0; d < n; ++d) t[d] = f32_to_bf16(src[d]);
  } else {
    _Float16* t = static_cast<_Float16*>(dst);
    for (int d = 0; d < n; ++d) t[d] = static_cast<_Float16>(src[d]);
  }
}

inline int elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

// A row's end of the online softmax: acc /= l in place (0 for a row that saw
// no key); returns its lse, m + log(l) (natural log), or -inf when empty.
inline float normalise_row(float* acc, float l, float m, int D) {
  const bool empty = l == 0.0f;
  const float inv = empty ? 0.0f : 1.0f / l;
#pragma omp simd
  for (int d = 0; d < D; ++d) acc[d] *= inv;
  return empty ? kNegInf : m + std::log(l);
}

// ---- micro-kernels: scores = Q K^T over a chunk, acc += P V -----------------
// Q rows stay in L1 across the chunk; every K/V row is read from memory once
// and used by all rows of the query group, which is what keeps decode
// memory-bound rather than compute-bound.

#ifdef LONGATTN_AVX2

template <typename T> inline float scalar_at(const T* p, int d) { return static_cast<float>(p[d]); }
template <> inline float scalar_at<uint16_t>(const uint16_t* p, int d) { return bf16_to_f32(p[d]); }

// Eight horizontal sums at once: out[i] = sum of the lanes of v[i].
inline __m256 hsum8(const __m256 v[8]) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// R rows (1..4) x 2 keys per step: 2R independent FMA chains, each K element
// loaded (and widened) once for all R rows.
template <int R, typename T>
void qk_rows(const float* q, int D, const void* const* krow, int n, float* s, int s_stride) {
  using V = Isa;
  const int dv = D - D % V::W;
  int j = 0;
  for (; j + 1 < n; j += 2) {
    typename V::vec acc[8];  // acc[2r] key j, acc[2r+1] key j+1
    for (int i = 0; i < 8; ++i) acc[i] = V::zero();
    const T* k0 = static_cast<const T*>(krow[j]);
    const T* k1 = static_cast<const T*>(krow[j + 1]);
    for (int d = 0; d < dv; d += V::W) {
      const typename V::vec x0 = V::load(k0 + d), x1 = V::load(k1 + d);
      for (int r = 0; r < R; ++r) {
        const typename V::vec qv = V::load(q + r * D + d);
        acc[2 * r] = V::fma(qv, x0, acc[2 * r]);
        acc[2 * r + 1] = V::fma(qv, x1, acc[2 * r + 1]);
      }
    }
    __m256 folded[8];
    for (int i = 0; i < 8; ++i) folded[i] = V::fold8(acc[i]);
    alignas(32) float sums[8];
    _mm256_store_ps(sums, hsum8(folded));
    for (int r = 0; r < R; ++r) {
      float t0 = sums[2 * r], t1 = sums[2 * r + 1];
      for (int d = dv; d < D; ++d) { t0 += q[r * D + d] * scalar_at(k0, d); t1 += q[r * D + d] * scalar_at(k1, d); }
      s[r * s_stride + j] = t0;
      s[r * s_stride + j + 1] = t1;
    }
  }
  for (; j < n; ++j) {
    const T* kj = static_cast<const T*>(krow[j]);
    for (int r = 0; r < R; ++r) {
      typename V::vec a = V::zero();
      for (int d = 0; d < dv; d += V::W) a = V::fma(V::load(q + r * D + d), V::load(kj + d), a);
      float t = hsum(V::fold8(a));
      for (int d = dv; d < D; ++d) t += q[r * D + d] * scalar_at(kj, d);
      s[r * s_stride + j] = t;
    }
  }
}

// acc[r] += sum_j p[r][j] * v_j for R rows (1..4), 2W columns at a time held in registers.
template <int R, typename T>
void pv_rows(const float* p, int p_stride, const void* const* vrow, int n, float* acc, int D) {
  using V = Isa;
  int d = 0;
  for (; d + 2 * V::W <= D; d += 2 * V::W) {
    typename V::vec a0[R], a1[R];
    for (int r = 0; r < R; ++r) { a0[r] = V::load(acc + r * D + d); a1[r] = V::load(acc + r * D + d + V::W); }
    for (int j = 0; j < n; ++j) {
      const T* vj = static_cast<const T*>(vrow[j]);
      const typename V::vec v0 = V::load(vj + d), v1 = V::load(vj + d + V::W);
      for (int r = 0; r < R; ++r) {
        const typename V::vec pb = V::set1(p[r * p_stride + j]);
        a0[r] = V::fma(pb, v0, a0[r]);
        a1[r] = V::fma(pb, v1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) { V::store(acc + r * D + d, a0[r]); V::store(acc + r * D + d + V::W, a1[r]); }
  }
  for (; d + V::W <= D; d += V::W) {
    typename V::vec a0[R];
    for (int r = 0; r < R; ++r) a0[r] = V::load(acc + r * D + d);
    for (int j = 0; j < n; ++j) {
      const typename V::vec v0 = V::load(static_cast<const T*>(vrow[j]) + d);
      for (int r = 0; r < R; ++r) a0[r] = V::fma(V::set1(p[r * p_stride + j]), v0, a0[r]);
    }
    for (int r = 0; r < R; ++r) V::store(acc + r * D + d, a0[r]);
  }
  for (; d < D; ++d)
    for (int r = 0; r < R; ++r) {
      float t = acc[r * D + d];
      for (int j = 0; j < n; ++j) t += p[r * p_stride + j] * scalar_at(static_cast<const T*>(vrow[j]), d);
      acc[r * D + d] = t;
    }
}

#ifdef LONGATTN_AVX512BF16
// bfloat16 K against the unscaled bfloat16 q: every bf16 x bf16 product is
// exact in float32, and vdpbf16ps adds pairs of them into float32
// accumulators, 32 elements per instruction, without widening K first.
// Scores are scaled after the sum (scaling q would round it).
template <int R>
void qk_rows_bf16dot(const uint16_t* q, int D, const void* const* krow, int n, float* s, int s_stride, float scale) {
  const int dv = D - D % 32;
  auto dot_tail = [&](int r, const uint16_t* k) {
    float t = 0.0f;
    for (int d = dv; d < D; ++d) t += bf16_to_f32(q[r * D + d]) * bf16_to_f32(k[d]);
    return t;
  };
  int j = 0;
  for (; j + 1 < n; j += 2) {
    __m512 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
    const uint16_t* k0 = static_cast<const uint16_t*>(krow[j]);
    const uint16_t* k1 = static_cast<const uint16_t*>(krow[j + 1]);
    for (int d = 0; d < dv; d += 32) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(k0 + d), x1 = (__m512bh)_mm512_loadu_si512(k1 + d);
      for (int r = 0; r < R; ++r) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + r * D + d);
        acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], qv, x0);
        acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], qv, x1);
      }
    }
    __m256 folded[8];
    for (int i = 0; i < 8; ++i) folded[i] = Avx512::fold8(acc[i]);
    alignas(32) float sums[8];
    _mm256_store_ps(sums, hsum8(folded));
    for (int r = 0; r < R; ++r) {
      s[r * s_stride + j] = (sums[2 * r] + dot_tail(r, k0)) * scale;
      s[r * s_stride + j + 1] = (sums[2 * r + 1] + dot_tail(r, k1)) * scale;
    }
  }
  for (; j < n; ++j) {
    const uint16_t* kj = static_cast<const uint16_t*>(krow[j]);
    for (int r = 0; r < R; ++r) {
      __m512 a = _mm512_setzero_ps();
      for (int d = 0; d < dv; d += 32)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q + r * D + d), (__m512bh)_mm512_loadu_si512(kj + d));
      s[r * s_stride + j] = (hsum(Avx512::fold8(a)) + dot_tail(r, kj)) * scale;
    }
  }
}

void qk_block_bf16dot(const uint16_t* q, int rows, int D, const void* const* krow, int n, float* s, int s_stride,
                      float scale) {
  // Row r's slices, offsets in size_t (a row index times headdim or a stride).
  auto qr = [&](int r) { return q + static_cast<size_t>(r) * D; };
  auto sr = [&](int r) { return s + static_cast<size_t>(r) * s_stride; };
  int r = 0;
  for (; r + 4 <= rows; r += 4) qk_rows_bf16dot<4>(qr(r), D, krow, n, sr(r), s_stride, scale);
  switch (rows - r) {
    case 3: qk_rows_bf16dot<3>(qr(r), D, krow, n, sr(r), s_stride, scale); break;
    case 2: qk_rows_bf16dot<2>(qr(r), D, krow, n, sr(r), s_stride, scale); break;
    case 1: qk_rows_bf16dot<1>(qr(r), D, krow, n, sr(r), s_stride, scale); break;
    default: break;
  }
}
#endif

template <typename T>
void qk_block_typed(const float* q, int rows, int D, const void* const* krow, int n, float* s, int s_stride) {
  auto qr = [&](int r) { return q + static_cast<size_t>(r) * D; };  // offsets in size_t, as above
  auto sr = [&](int r) { return s + static_cast<size_t>(r) * s_stride; };
  int r = 0;
  for (; r + 4 <= rows; r += 4) qk_rows<4, T>(qr(r), D, krow, n, sr(r), s_stride);
  switch (rows - r) {
    case 3: qk_rows<3, T>(qr(r), D, krow, n, sr(r), s_stride); break;
    case 2: qk_rows<2, T>(qr(r), D, krow, n, sr(r), s_stride); break;
    case 1: qk_rows<1, T>(qr(r), D, krow, n, sr(r), s_stride); break;
    default: break;
  }
}

template <typename T>
void pv_block_typed(const float* p, int rows, int p_stride, const void* const* vrow, int n, float* acc, int D) {
  auto pr = [&](int r) { return p + static_cast<size_t>(r) * p_stride; };  // offsets in size_t, as above
  auto ar = [&](int r) { return acc + static_cast<size_t>(r) * D; };
  int r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows<4, T>(pr(r), p_stride, vrow, n, ar(r), D);
  switch (rows - r) {
    case 3: pv_rows<3, T>(pr(r), p_stride, vrow, n, ar(r), D); break;
    case 2: pv_rows<2, T>(pr(r), p_stride, vrow, n, ar(r), D); break;
    case 1: pv_rows<1, T>(pr(r), p_stride, vrow, n, ar(r), D); break;
    default: break;
  }
}
#endif

// scores[r][j] = q_r . k_j; rows are fp32 (widened) unless AVX2 reads them typed.
void qk_block(const float* q, int rows, int D, int dtype, const void* const* krow, int n, float* s, int s_stride) {
#ifdef LONGATTN_AVX2
  if (dtype == kBF16) return qk_block_typed<uint16_t>(q, rows, D, krow, n, s, s_stride);
  if (dtype == kF16) return qk_block_typed<_Float16>(q, rows, D, krow, n, s, s_stride);
  return qk_block_typed<float>(q, rows, D, krow, n, s, s_stride);
#else
  (void)dtype;
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < n; ++j) {
      const float* kj = static_cast<const float*>(krow[j]);
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int d = 0; d < D; ++d) dot += q[static_cast<size_t>(r) * D + d] * kj[d];
      s[static_cast<size_t>(r) * s_stride + j] = dot;
    }
#endif
}

void pv_block(const float* p, int rows, int p_stride, int dtype, const void* const* vrow, int n, float* acc, int D) {
#ifdef LONGATTN_AVX2
  if (dtype == kBF16) return pv_block_typed<uint16_t>(p, rows, p_stride, vrow, n, acc, D);
  if (dtype == kF16) return pv_block_typed<_Float16>(p, rows, p_stride, vrow, n, acc, D);
  return pv_block_typed<float>(p, rows, p_stride, vrow, n, acc, D);
#else
  (void)dtype;
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < n; ++j) {
      const float pj = p[static_cast<size_t>(r) * p_stride + j];
      const float* vj = static_cast<const float*>(vrow[j]);
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[static_cast<size_t>(r) * D + d] += pj * vj[d];
    }
#endif
}

#ifdef LONGATTN_AVX2
// ---- lane-per-key micro-kernels: the stream-K decode kernel's fast path -----
// A chunk is kWide keys (16 with AVX-512, 8 with AVX2), one per vector lane:
// a row's scores are one vector, so the online softmax (max, exp, sum) runs on
// whole vectors once per chunk, and the dot products need no horizontal sum
// per key (ReduceKeys folds the per-key accumulators into one vector of sums,
// kWide - 1 adds for kWide keys). Written once over Isa; the register budget
// (32 vector registers with AVX-512, 16 with AVX2) sets the row blocks.
constexpr int kWide = Isa::W;
using WVec = Isa::vec;
#ifdef LONGATTN_AVX512
constexpr int kQkRows = 4;  // QK: 4 rows x 4 keys = 16 accumulators, + 4 K vectors
constexpr int kPvRows = 4, kPvVecs = 4;  // PV: 4 rows x 64 columns = 16 accumulators
#else
// 16 registers: QK 2 rows x 4 keys = 8 accumulators + 4 K + q (4 rows spilled);
// PV 4 rows x 16 columns = 8 accumulators + 2 V + p.
constexpr int kQkRows = 2;
constexpr int kPvRows = 4, kPvVecs = 2;  // 2 rows x 32 columns measured the same
#endif
constexpr int kPvColumns = kPvVecs * kWide;  // columns of one PV register block

// bfloat16 K/V rows read in pairs of vectors (the widening path without
// AVX512-BF16): each 2 * kWide elements are loaded as their even and their
// odd elements (Isa::load_bf16_even/odd, one shift or mask each) instead of
// two zero-extending shuffles and two shifts. Row vector 2i then holds
// columns 2i*kWide + 2l and vector 2i+1 columns 2i*kWide + 2l + 1: q rows are
// permuted to match (permute_columns) so dot products are unchanged, and P V
// accumulates in the permuted column order, undone once per segment.
// Decode from memory ran a few percent faster this way in the AVX2 build
// (Zen 4, A/B in one process, 4 of 5 runs); the widening ops, not the FMAs,
// are what it saves.
struct Bf16Pairs { uint16_t bits; };
template <typename T> constexpr bool kIsPairs = std::is_same_v<T, Bf16Pairs>;
static_assert(kPvColumns % (2 * kWide) == 0, "PV register blocks must hold whole pairs of vectors");

// Row vector i (kWide columns) of a K/V row of type T, widened to float32.
template <typename T>
__attribute__((always_inline)) inline WVec load_row_vector(const T* row, int i) {
  if constexpr (kIsPairs<T>) {
    const uint16_t* block = reinterpret_cast<const uint16_t*>(row) + kWide * (i & ~1);
    return (i & 1) ? Isa::load_bf16_odd(block) : Isa::load_bf16_even(block);
  } else {
    return Isa::load(row + kWide * i);
  }
}

// Column position pos (< 2 * kWide) of a pair block holds column pair_column(pos).
inline int pair_column(int pos) { return pos < kWide ? 2 * pos : 2 * (pos - kWide) + 1; }

// n rows of D floats (D % kBlock == 0) whose kBlock-column blocks are
// permuted so that position pos holds column column_of(pos): from natural
// order to the permuted one (to_permuted) or back. Shared by the layouts
// the PV micro-kernels accumulate in (pair_column, bf16dot_column). Run once
// per decode segment over its rows x headdim accumulators: the mapping is
// tabled first (column_of is passed as a function pointer, and calling it
// per element took ~1/3 of a 16-key bf16 decode segment, Zen 4), and with
// AVX-512 a 32-column block is two two-source permutes.
template <int kBlock, class ColumnOf>
inline void permute_columns(float* rows, int n, int D, ColumnOf column_of, bool to_permuted) {
  alignas(64) int32_t from[kBlock];  // position i of the result takes the block's element from[i]
  for (int pos = 0; pos < kBlock; ++pos) {
    if (to_permuted) from[pos] = column_of(pos);
    else from[column_of(pos)] = pos;
  }
  const int64_t total = static_cast<int64_t>(n) * D;  // rows are contiguous: blocks follow each other
#ifdef LONGATTN_AVX512
  if constexpr (kBlock == 32) {
    const __m512i lo = _mm512_load_si512(from), hi = _mm512_load_si512(from + 16);
    for (int64_t i = 0; i < total; i += kBlock) {
      const __m512 a = _mm512_loadu_ps(rows + i), b = _mm512_loadu_ps(rows + i + 16);
      _mm512_storeu_ps(rows + i, _mm512_permutex2var_ps(a, lo, b));
      _mm512_storeu_ps(rows + i + 16, _mm512_permutex2var_ps(a, hi, b));
    }
    return;
  }
#endif
  float block[kBlock];
  for (int64_t i = 0; i < total; i += kBlock) {
    for (int pos = 0; pos < kBlock; ++pos) block[pos] = rows[i + from[pos]];
    std::memcpy(rows + i, block, sizeof(block));
  }
}

// Forced inlining for the fp32 PV blocks: left to itself, gcc 12 calls each
// 4-key block out of line and sends its 16 accumulators through the stack on
// every call; inlined into the segment loop, fp32 decode with the cache in L3
// ran 10-20% faster (Zen 4, AVX-512, A/B in one process; 128k from memory: the
// same or better). The bf16 PV blocks measured the same either way.
#define LONGATTN_HOT_INLINE __attribute__((always_inline)) inline

// The sum of each of kWide accumulators (one per key) into lane j of one
// vector, in steps so the accumulators need not be live at once: group_store
// folds the 4 accumulators of keys 4g .. 4g+3 (as they are computed, 4
// independent FMA chains) into one vector kept in memory (kReduceFloats floats
// per q row: the row's groups may be computed far apart in time, between other
// heads' work), finish_stored combines the kWide / 4 stored vectors. The order
// of the additions is fixed (deterministic).
struct ReduceKeys {
#ifdef LONGATTN_AVX512
  // Lanes of 128-bit lane L: keys 4g .. 4g+3, each summed over L's 4 lanes; at w + 16 g.
  static void group_store(float* w, int g, __m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    // per 128-bit lane: keys 4g, 4g+1 (w0) and 4g+2, 4g+3 (w1) in pairs of lanes, then all 4 keys
    const __m512 w0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 w1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    _mm512_storeu_ps(w + 16 * g, _mm512_add_ps(_mm512_shuffle_ps(w0, w1, _MM_SHUFFLE(1, 0, 1, 0)),
                                               _mm512_shuffle_ps(w0, w1, _MM_SHUFFLE(3, 2, 3, 2))));
  }
  // Lane j = the sum of the 16 lanes of key j's accumulator.
  static __m512 finish_stored(const float* w) {
    __m512 x[4];
    for (int i = 0; i < 4; ++i) x[i] = _mm512_loadu_ps(w + 16 * i);
    __m512 y[2];  // [x2i (L0+L1), x2i (L2+L3), x2i+1 (L0+L1), x2i+1 (L2+L3)]
    for (int i = 0; i < 2; ++i)
      y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
#else
  // The same folding on 256 bits: each 128-bit lane L of the stored vector
  // holds keys 4g .. 4g+3, each summed over L's 4 lanes; at w + 8 g.
  static void group_store(float* w, int g, __m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 w0 = _mm256_add_ps(_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
    const __m256 w1 = _mm256_add_ps(_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
    _mm256_storeu_ps(w + 8 * g, _mm256_add_ps(_mm256_shuffle_ps(w0, w1, _MM_SHUFFLE(1, 0, 1, 0)),
                                              _mm256_shuffle_ps(w0, w1, _MM_SHUFFLE(3, 2, 3, 2))));
  }
  // Lane j = the sum of the 8 lanes of key j's accumulator: group g's two 128-bit halves added.
  static __m256 finish_stored(const float* w) {
    const __m256 x0 = _mm256_loadu_ps(w), x1 = _mm256_loadu_ps(w + 8);
    return _mm256_add_ps(_mm256_permute2f128_ps(x0, x1, 0x20), _mm256_permute2f128_ps(x0, x1, 0x31));
  }
#endif
};
constexpr int kReduceFloats = (kWide / 4) * kWide;

// Software prefetch spread over the compute: a cursor over the K and V rows
// of a later chunk. Each micro-kernel calls step(cost) with the vector
// multiply-adds it just issued; the cursor issues prefetches in proportion,
// so the chunk's lines go out at an even rate over its compute. A burst
// fills the core's miss buffers and the compute stalls behind it: the
// previous scheme, a fixed number of lines per step, sent most of them
// during the PV steps (16 multiply-adds each, against 128 per QK step), and
// decode at 128k keys ran 4-9% slower in fp32 (AVX2 build: 1.1x fp32, 1.2x
// bf16; Zen 4, A/B in one process); issuing them all in the first half of
// the chunk was 1.2-1.4x slower still. A key's rows over the tile's heads
// are `lines` (a multiple of kPrefetchLines) lines. Into L2 (T1): measured on
// Zen 4, T0 (L1) was 1.5x slower, T2 the same as T1, NTA slower.
struct Prefetcher {
  static constexpr int kPrefetchLines = 2;  // K and V lines per issue (1 and 4 measured the same or slower)
  const char* k[kWide];
  const char* v[kWide];
  int nkeys = 0, lines = 0;  // keys, 64-byte lines per key
  // credit / work = issues due: each step adds cost * issues, where issues =
  // nkeys * lines / kPrefetchLines is the chunk's total and work its total cost.
  int64_t issues = 0, work = 1, credit = 0;
  int key = 0, line = 0;  // the cursor
  inline void step(int cost) {
    credit += int64_t{cost} * issues;
    for (; credit >= work && key < nkeys; credit -= work) {
      const char* kp = k[key] + 64 * line;
      const char* vp = v[key] + 64 * line;
#pragma GCC unroll 4
      for (int x = 0; x < kPrefetchLines; ++x) {
        _mm_prefetch(kp + 64 * x, _MM_HINT_T1);
        _mm_prefetch(vp + 64 * x, _MM_HINT_T1);
      }
      line += kPrefetchLines;
      if (line >= lines) { line = 0; ++key; }
    }
  }
};

// Scores of R (1..kQkRows) scaled fp32 q rows (stride D) against 4 K rows
// k4[0..3] of type T (float, _Float16, bf16 as uint16_t or Bf16Pairs, widened in
// registers; one kv head), keys 4g .. 4g+3 of the chunk, folded into each
// row's stored ReduceKeys state (red + r * kReduceFloats). Each K vector is
// loaded once for the R rows (held in registers: left to itself gcc 12
// re-read each K vector from memory for every row, and fp32 decode with the
// cache in L1 took ~19% more cycles per key with AVX-512, ~7% with AVX2;
// Zen 4, A/B in one process), and each q vector once for the 4 keys (held
// likewise: gcc had folded the q load into all 4 FMAs, 160 vector loads per
// 128 FMAs, which bound the loop on the load ports; with the cache in L1 and
// one thread, QK took ~1.35x as long; fp32 decode of 1k keys (in L3) ran
// 9-11% slower in the AVX-512 and AVX2 builds, of 4k keys the same (AVX-512)
// or 7% slower (AVX2), from memory the same; Zen 4, A/B in one process). D % kWide == 0; ND = D / kWide when known at
// compile time (the loop is unrolled), else 0. The caller walks a chunk 4
// keys at a time over all heads, i.e. in the cache's address order. pf steps by the FMAs issued.
template <int R, int ND, typename T>
inline void qk4_rows(const float* q, int D, const char* const* k4, float* red, int g, Prefetcher& pf) {
  const int nd = ND > 0 ? ND : D / kWide;
  const T* k[4];
  for (int u = 0; u < 4; ++u) k[u] = reinterpret_cast<const T*>(k4[u]);
  WVec a[R][4];
  {
    WVec x[4];
    for (int u = 0; u < 4; ++u) x[u] = in_register(load_row_vector(k[u], 0));
    for (int r = 0; r < R; ++r) {
      const WVec qv = in_register(Isa::load(q + static_cast<size_t>(r) * D));
      for (int u = 0; u < 4; ++u) a[r][u] = Isa::mul(qv, x[u]);
    }
  }
#pragma GCC unroll 16
  for (int i = 1; i < nd; ++i) {
    WVec x[4];
    for (int u = 0; u < 4; ++u) x[u] = in_register(load_row_vector(k[u], i));
    for (int r = 0; r < R; ++r) {
      const WVec qv = in_register(Isa::load(q + static_cast<size_t>(r) * D + kWide * i));
      for (int u = 0; u < 4; ++u) a[r][u] = Isa::fma(qv, x[u], a[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
    ReduceKeys::group_store(red + static_cast<size_t>(r) * kReduceFloats, g, a[r][0], a[r][1], a[r][2], a[r][3]);
  pf.step(R * 4 * nd);
}

// qk4_rows over `rows` rows (blocks of kQkRows, then the rest).
template <int ND, typename T>
inline void qk4_block(const float* q, int rows, int D, const char* const* k4, float* red, int g, Prefetcher& pf) {
  auto qr = [&](int r) { return q + static_cast<size_t>(r) * D; };
  auto wr = [&](int r) { return red + static_cast<size_t>(r) * kReduceFloats; };
  int r = 0;
  for (; r + kQkRows <= rows; r += kQkRows) qk4_rows<kQkRows, ND, T>(qr(r), D, k4, wr(r), g, pf);
  switch (rows - r) {  // fewer than kQkRows left
    case 3: qk4_rows<3, ND, T>(qr(r), D, k4, wr(r), g, pf); break;
    case 2: qk4_rows<2, ND, T>(qr(r), D, k4, wr(r), g, pf); break;
    case 1: qk4_rows<1, ND, T>(qr(r), D, k4, wr(r), g, pf); break;
    default: break;
  }
}

// acc[r][d] += sum_j p[r][j] v_j[d] for R rows (1..kPvRows) and NV
// (1..kPvVecs) vectors of kWide columns from d0: the accumulators stay in
// registers over the chunk.
template <int R, int NV, typename T>
LONGATTN_HOT_INLINE void pv_lanes_rows(const float* p, int p_stride, const char* const* vrow, int n, float* acc, int D,
                                       int d0, Prefetcher& pf) {
  WVec a[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) a[r][v] = Isa::load(acc + static_cast<size_t>(r) * D + d0 + kWide * v);
  for (int j = 0; j < n; ++j) {
    const T* vj = reinterpret_cast<const T*>(vrow[j]) + d0;
    WVec x[NV];
    for (int v = 0; v < NV; ++v) x[v] = load_row_vector(vj, v);
    for (int r = 0; r < R; ++r) {
      const WVec pb = Isa::set1(p[r * p_stride + j]);
      for (int v = 0; v < NV; ++v) a[r][v] = Isa::fma(pb, x[v], a[r][v]);
    }
    pf.step(R * NV);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) Isa::store(acc + static_cast<size_t>(r) * D + d0 + kWide * v, a[r][v]);
}

template <int R, typename T>
LONGATTN_HOT_INLINE void pv_lanes_rows_all(const float* p, int p_stride, const char* const* vrow, int n, float* acc,
                                           int D, Prefetcher& pf) {
  int d0 = 0;
  for (; d0 + kPvColumns <= D; d0 += kPvColumns) pv_lanes_rows<R, kPvVecs, T>(p, p_stride, vrow, n, acc, D, d0, pf);
  if constexpr (kIsPairs<T>) {  // D % (2 * kWide) == 0: whole pairs of vectors left
    if (d0 < D) pv_lanes_rows<R, 2, T>(p, p_stride, vrow, n, acc, D, d0, pf);
  } else {
    switch ((D - d0) / kWide) {  // fewer than kPvVecs vectors left
      case 3: pv_lanes_rows<R, 3, T>(p, p_stride, vrow, n, acc, D, d0, pf); break;
      case 2: pv_lanes_rows<R, 2, T>(p, p_stride, vrow, n, acc, D, d0, pf); break;
      case 1: pv_lanes_rows<R, 1, T>(p, p_stride, vrow, n, acc, D, d0, pf); break;
      default: break;
    }
  }
}

// acc (rows x D) += P V over the chunk's n keys; P rows have stride p_stride;
// D % kWide == 0. pf steps once per key, row block and kPvColumns columns (by the FMAs issued).
template <typename T>
LONGATTN_HOT_INLINE void pv_lanes_block(const float* p, int rows, int p_stride, const char* const* vrow, int n,
                                        float* acc, int D, Prefetcher& pf) {
  auto pr = [&](int r) { return p + static_cast<size_t>(r) * p_stride; };
  auto ar = [&](int r) { return acc + static_cast<size_t>(r) * D; };
  int r = 0;
  for (; r + kPvRows <= rows; r += kPvRows) pv_lanes_rows_all<kPvRows, T>(pr(r), p_stride, vrow, n, ar(r), D, pf);
  switch (rows - r) {  // fewer than kPvRows left
    case 3: pv_lanes_rows_all<3, T>(pr(r), p_stride, vrow, n, ar(r), D, pf); break;
    case 2: pv_lanes_rows_all<2, T>(pr(r), p_stride, vrow, n, ar(r), D, pf); break;
    case 1: pv_lanes_rows_all<1, T>(pr(r), p_stride, vrow, n, ar(r), D, pf); break;
    default: break;
  }
}

#ifdef LONGATTN_AVX512BF16
// qk4_rows for bf16 K against R (1..4) unscaled bf16 q rows with vdpbf16ps
// (bf16 x bf16 products are exact in fp32, summed in fp32); the caller
// scales the finished sums (scaling q would round it). D % 32 == 0, NB = D /
// 32 when known at compile time, else 0.
template <int R, int NB>
inline void qk4_rows_bf16dot(const uint16_t* q, int D, const char* const* k4, float* red, int g, Prefetcher& pf) {
  const int nb = NB > 0 ? NB : D / 32;
  const uint16_t* k[4];
  for (int u = 0; u < 4; ++u) k[u] = reinterpret_cast<const uint16_t*>(k4[u]);
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < 4; ++u) a[r][u] = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < nb; ++i) {
    __m512bh x[4];
    for (int u = 0; u < 4; ++u) x[u] = (__m512bh)_mm512_loadu_si512(k[u] + 32 * i);
    for (int r = 0; r < R; ++r) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + static_cast<size_t>(r) * D + 32 * i);
      for (int u = 0; u < 4; ++u) a[r][u] = _mm512_dpbf16_ps(a[r][u], qv, x[u]);
    }
  }
  for (int r = 0; r < R; ++r)
    ReduceKeys::group_store(red + static_cast<size_t>(r) * kReduceFloats, g, a[r][0], a[r][1], a[r][2], a[r][3]);
  pf.step(R * 4 * nb);
}

template <int NB>
inline void qk4_block_bf16dot(const uint16_t* q, int rows, int D, const char* const* k4, float* red, int g,
                              Prefetcher& pf) {
  auto qr = [&](int r) { return q + static_cast<size_t>(r) * D; };
  auto wr = [&](int r) { return red + static_cast<size_t>(r) * kReduceFloats; };
  int r = 0;
  for (; r + 4 <= rows; r += 4) qk4_rows_bf16dot<4, NB>(qr(r), D, k4, wr(r), g, pf);
  switch (rows - r) {
    case 3: qk4_rows_bf16dot<3, NB>(qr(r), D, k4, wr(r), g, pf); break;
    case 2: qk4_rows_bf16dot<2, NB>(qr(r), D, k4, wr(r), g, pf); break;
    case 1: qk4_rows_bf16dot<1, NB>(qr(r), D, k4, wr(r), g, pf); break;
    default: break;
  }
}

// P V with vdpbf16ps: P is rounded to bf16 (as flash-attention does on GPUs)
// and two keys are done per instruction. pp[r][i] holds the bf16 pair
// (p[r][2i], p[r][2i+1]) as one 32-bit word; V rows 2i and 2i+1 are
// interleaved in registers (unpacklo/hi_epi16), so a broadcast pair times an
// interleaved vector gives p_2i v_2i[d] + p_2i+1 v_2i+1[d] per fp32 lane.
// The interleave works inside 128-bit lanes, so the accumulator holds each
// 32-column block permuted: positions [0, 16) are columns 8*(l/4) + l%4
// (unpacklo), [16, 32) the same + 4 (unpackhi); see bf16dot_column.
// n odd: the last pair's second row is row n-1 again, with p = 0.
template <int R, int NB>
inline void pv16_bf16dot_rows(const uint32_t* pp, int pp_stride, const char* const* vrow, int n, float* acc, int D,
                              int d0, Prefetcher& pf) {
  __m512 a[R][2 * NB];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2 * NB; ++v) a[r][v] = _mm512_loadu_ps(acc + static_cast<size_t>(r) * D + d0 + 16 * v);
  for (int j = 0; j < n; j += 2) {
    const uint16_t* v0 = reinterpret_cast<const uint16_t*>(vrow[j]) + d0;
    const uint16_t* v1 = reinterpret_cast<const uint16_t*>(vrow[j + 1 < n ? j + 1 : j]) + d0;
    __m512bh x[2 * NB];
    for (int b = 0; b < NB; ++b) {
      const __m512i x0 = _mm512_loadu_si512(v0 + 32 * b), x1 = _mm512_loadu_si512(v1 + 32 * b);
      x[2 * b] = (__m512bh)_mm512_unpacklo_epi16(x0, x1);
      x[2 * b + 1] = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[r * pp_stride + j / 2]));
      for (int v = 0; v < 2 * NB; ++v) a[r][v] = _mm512_dpbf16_ps(a[r][v], pb, x[v]);
    }
    pf.step(R * 2 * NB);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2 * NB; ++v) _mm512_storeu_ps(acc + static_cast<size_t>(r) * D + d0 + 16 * v, a[r][v]);
}

template <int R>
inline void pv16_bf16dot_rows_all(const uint32_t* pp, int pp_stride, const char* const* vrow, int n, float* acc,
                                  int D, Prefetcher& pf) {
  int d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) pv16_bf16dot_rows<R, 2>(pp, pp_stride, vrow, n, acc, D, d0, pf);
  if (d0 < D) pv16_bf16dot_rows<R, 1>(pp, pp_stride, vrow, n, acc, D, d0, pf);
}

// acc (rows x D, permuted blocks) += P V; pp rows have stride pp_stride words;
// D % 32 == 0. pf steps once per key pair and 64 columns (by the vdpbf16ps issued).
inline void pv16_bf16dot_block(const uint32_t* pp, int rows, int pp_stride, const char* const* vrow, int n,
                               float* acc, int D, Prefetcher& pf) {
  auto pr = [&](int r) { return pp + static_cast<size_t>(r) * pp_stride; };
  auto ar = [&](int r) { return acc + static_cast<size_t>(r) * D; };
  int r = 0;
  for (; r + 4 <= rows; r += 4) pv16_bf16dot_rows_all<4>(pr(r), pp_stride, vrow, n, ar(r), D, pf);
  switch (rows - r) {
    case 3: pv16_bf16dot_rows_all<3>(pr(r), pp_stride, vrow, n, ar(r), D, pf); break;
    case 2: pv16_bf16dot_rows_all<2>(pr(r), pp_stride, vrow, n, ar(r), D, pf); break;
    case 1: pv16_bf16dot_rows_all<1>(pr(r), pp_stride, vrow, n, ar(r), D, pf); break;
    default: break;
  }
}

// The column that accumulator position `pos` of pv16_bf16dot_block holds.
inline int bf16dot_column(int pos) {
  const int block = pos & ~31, l = pos & 15, hi = (pos >> 4) & 1;
  return block + 8 * (l >> 2) + 4 * hi + (l & 3);
}
#endif  // LONGATTN_AVX512BF16
#endif  // LONGATTN_AVX2 (lane-per-key micro-kernels)

float row_max(const float* s, int n) {
  float m = kNegInf;
  int j = 0;
#ifdef LONGATTN_AVX2
  if (n >= 8) {
    __m256 mv = _mm256_loadu_ps(s);
    for (j = 8; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mv);
    for (float x : lanes) m = std::max(m, x);
  }
#endif
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// p[j] = exp(s[j] - m) in place; returns the sum.
float exp_shifted(float* s, int n, float m) {
  float sum = 0.0f;
  int j = 0;
#ifdef LONGATTN_AVX2
  __m256 total = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m);
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    total = _mm256_add_ps(total, e);
  }
  sum = hsum(total);
#endif
  for (; j < n; ++j) { s[j] = std::exp(s[j] - m); sum += s[j]; }
  return sum;
}

// Folds one chunk of a row's scores s[0..n) (max chunk_max) into its online
// softmax: s becomes exp(s - m_new) in place (the chunk's P, for pv_block),
// the row's accumulator acc (D floats) and sum l are rescaled to the new
// running max m, and the chunk's sum added to l.
inline void fold_chunk(float* s, int n, float chunk_max, float* m, float* l, float* acc, int D) {
  const float m_new = std::max(*m, chunk_max);
  const float alpha = std::exp(*m - m_new);  // exp(-inf) = 0 on a row's first chunk
  const float sum = exp_shifted(s, n, m_new);
  if (alpha != 1.0f) {
#pragma omp simd
    for (int d = 0; d < D; ++d) acc[d] *= alpha;
  }
  *l = *l * alpha + sum;
  *m = m_new;
}

}  // namespace
