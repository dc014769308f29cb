// Flash-attention forward on the CPU: windows, attention sinks, softcap, GQA,
// listed (block-sparse) keys, packed (varlen) sequences; float32 or native
// bfloat16 arithmetic.
//
// Why our own: PyTorch's fused CPU kernel runs its block products through a
// BLAS that reaches ~150-186 GFLOP/s on the AMD machines' two cores, about
// the 256-bit FMA rate, while these AVX-512 micro-kernels keep the FMA units
// fuller (~180 GFLOP/s = 78% of the 234 GFLOP/s peak on a Zen 4 EPYC whose
// 512-bit FMAs issue at half rate; 260-330 on an EPYC with full-rate ones).
// And it visits only the key tiles a query block can see, so a sliding
// window (StreamingLLM's sinks + window) costs ~seqlen * (sink + window),
// never a dense pass.
//
// Structure: flash_tiles.h walks each work item's visible key tiles (the
// visibility rule, sinks, listed keys, masks); an engine does the arithmetic
// of a tile (scores, online softmax, P V):
//   * F32Engine: float32 inputs and FMAs (every CPU with AVX2; half-precision
//     inputs are widened by the caller);
//   * Bf16DotEngine: bfloat16 inputs read in place, vdpbf16ps dot products
//     with float32 accumulation (CPUs with AVX512-BF16), about twice the FMA
//     path's arithmetic per instruction;
//   * AmxEngine (flash_amx.h): bfloat16 through AMX tiles, where built.
// The caller chooses with `math`; longattn_flash_cpu_maths() says which this
// build has. Rows that see nothing get out = 0, lse = -inf. lse is
// natural-log. Each work item is computed by one thread in a fixed order:
// results do not depend on the thread count or schedule.
//
// Layouts (element strides, headdim innermost and contiguous):
//   q, out (batch, seqlen_q, nheads, headdim); k, v (batch, seqlen_k, nheads_k, headdim)
//   lse (batch, nheads, seqlen_q) contiguous.
// Varlen entry (longattn_flash_cpu_varlen, packed sequences as flash-attn's
// varlen functions): q, out (total_q, nheads, headdim); k, v (total_k, nheads_k,
// headdim); lse (nheads, total_q); each sequence is aligned on its own.
// headdim must be a multiple of the vector width (the caller pads).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "flash_tiles.h"  // the tile walk, Problem/Seq, the online softmax (and simd.h)

#ifdef LONGATTN_AVX2
namespace {

// ---- float32 math ------------------------------------------------------------

// A Qt vector, kept in a register with AVX2 (simd.h's in_register): with
// 16 registers gcc 12 folds each Qt load into every FMA that uses it (12
// loads + 4 broadcasts per 12 FMAs instead of 3 + 4: load-port bound). The
// AVX2 build ran 1.2-1.3x faster at 4k-8k (Zen 4, A/B in one process);
// AVX-512 code is left as the compiler makes it.
inline Isa::vec qt_vector(const float* p) {
  if constexpr (Isa::W == 8) return in_register(Isa::load(p));
  return Isa::load(p);
}

// St[j][0..NQA*W) = sum_d K[j][d] Qt[d][0..NQA*W) for KR keys (NQA <= NQ_STEP row vectors).
template <int NQA>
inline void score_keys(const float* qt, int headdim, const float* const* krow, float* st) {
  Isa::vec acc[KR][NQA];
  for (int j = 0; j < KR; ++j)
    for (int c = 0; c < NQA; ++c) acc[j][c] = Isa::zero();
  for (int d = 0; d < headdim; ++d) {
    Isa::vec qv[NQA];
    for (int c = 0; c < NQA; ++c) qv[c] = qt_vector(qt + d * BM + c * W);
    for (int j = 0; j < KR; ++j) {
      const Isa::vec kv = Isa::set1(krow[j][d]);
      for (int c = 0; c < NQA; ++c) acc[j][c] = Isa::fma(kv, qv[c], acc[j][c]);
    }
  }
  for (int j = 0; j < KR; ++j)
    for (int c = 0; c < NQA; ++c) Isa::store(st + j * BM + c * W, acc[j][c]);
}

// The tile's scores with the item's nq row vectors (st rows of stride BM),
// NQ_STEP vectors per micro-step: the KR keys' broadcasts come again from L1
// for each step of an AVX2 item's 6 vectors.
inline void score_tile(int nq, const float* qt, int headdim, const float* const* krow, int n_scored, float* st) {
  static_assert(NQ_STEP == 3, "score_tile dispatches 1..3 row vectors per step");
  for (int j = 0; j < n_scored; j += KR) {
    for (int c0 = 0; c0 < nq; c0 += NQ_STEP) {
      const float* q = qt + c0 * W;
      float* s = st + j * BM + c0 * W;
      switch (std::min(NQ_STEP, nq - c0)) {
        case 1: score_keys<1>(q, headdim, krow + j, s); break;
        case 2: score_keys<2>(q, headdim, krow + j, s); break;
        default: score_keys<3>(q, headdim, krow + j, s); break;
      }
    }
  }
}

// O[r][d0..d0+NVD*W) = alpha[r] O[r][..] + sum_{j<n} P[j][r] V[j][d0..] for R rows.
template <int NVD>
inline void accumulate_values(const float* pt, const float* alpha, const float* const* vrow, int d0, int n,
                              float* o, int headdim) {
  Isa::vec acc[R][NVD];
  for (int r = 0; r < R; ++r) {
    const Isa::vec a = Isa::set1(alpha[r]);
    for (int c = 0; c < NVD; ++c) acc[r][c] = Isa::mul(a, Isa::load(o + r * headdim + d0 + c * W));
  }
  for (int j = 0; j < n; ++j) {
    Isa::vec vv[NVD];
    for (int c = 0; c < NVD; ++c) vv[c] = Isa::load(vrow[j] + d0 + c * W);
    for (int r = 0; r < R; ++r) {
      const Isa::vec pv = Isa::set1(pt[j * BM + r]);
      for (int c = 0; c < NVD; ++c) acc[r][c] = Isa::fma(pv, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NVD; ++c) Isa::store(o + r * headdim + d0 + c * W, acc[r][c]);
}

void accumulate_chunk(int nvd, const float* pt, const float* alpha, const float* const* vrow, int d0, int n, float* o,
                      int headdim) {
  switch (nvd) {
    case 4: accumulate_values<4>(pt, alpha, vrow, d0, n, o, headdim); break;
    case 3: accumulate_values<3>(pt, alpha, vrow, d0, n, o, headdim); break;
    case 2: accumulate_values<2>(pt, alpha, vrow, d0, n, o, headdim); break;
    default: accumulate_values<1>(pt, alpha, vrow, d0, n, o, headdim); break;
  }
}

// float32 FMAs on inputs of type T: float, bfloat16 bits (uint16_t) or
// _Float16 (the "fp32" engine for half inputs). The item's queries, pre-scaled, are stored
// transposed (Qt[d][row]) once, so that
//   * scores of a tile come out key-major, St[key][row] += K[key][d] * Qt[d][row]:
//     each K element is broadcast straight from its row in memory (no packing
//     of K), each Qt vector serves KR keys;
//   * the online softmax is vectorised over rows;
//   * P V accumulates O[row][d] from V rows read in place, R rows x NV vectors.
// bfloat16/float16 K/V rows are widened per tile into L1-resident float32 rows
// (kbuf/vbuf, ~1% of the tile's work) instead of the caller widening whole
// tensors: half the bytes from memory, no float32 copy of K and V. Widening
// is exact, so the results are bitwise those of float32 inputs of the same values.
template <class T>
struct F32EngineT : RowState {
  std::vector<float> qt;          // (headdim, BM) scaled queries, transposed
  std::vector<float> kbuf, vbuf;  // (BN, headdim) the tile's widened rows (T != float)
  std::vector<float> qrow;        // one widened query row (T != float)
  F32EngineT(int headdim, SharedTile*)
      : RowState(headdim), qt(static_cast<size_t>(headdim) * BM),
        kbuf(std::is_same_v<T, float> ? 0 : static_cast<size_t>(BN) * headdim),
        vbuf(std::is_same_v<T, float> ? 0 : static_cast<size_t>(BN) * headdim),
        qrow(std::is_same_v<T, float> ? 0 : headdim) {}

  // Row `src` (headdim elements of T) as float32: in place for float, else widened into dst.
  static const float* as_float(const T* src, float* dst, int headdim) {
    if constexpr (std::is_same_v<T, float>) {
      (void)dst; (void)headdim;
      return src;
    } else {
      for (int d = 0; d < headdim; d += W) Isa::store(dst + d, Isa::load(src + d));
      return dst;
    }
  }

  void begin(const Problem& pb, const Seq& sq, int h, int first_row, int rows) {
    for (int r = 0; r < BM; ++r) {
      const float* q = as_float(query_row<T>(pb, sq, h, first_row, r, rows), qrow.data(), pb.headdim);
      for (int d = 0; d < pb.headdim; ++d) qt[d * BM + r] = r < rows ? q[d] * pb.scale : 0.0f;
    }
    reset(rows);
  }

  void tile(const Problem& pb, const Seq& sq, int kv_head, const int64_t* keys, const uint8_t* listed, int n,
            int rows, int64_t p0, bool needs_mask) {
    const int headdim = pb.headdim;
    const T* k_base = head_rows<T>(sq.k, pb.k_sh, kv_head);
    const T* v_base = head_rows<T>(sq.v, pb.v_sh, kv_head);
    const float* krow[BN];
    const float* vrow[BN];
    for (int j = 0; j < BN; ++j) {  // keys past n repeat the last one (masked out)
      if (j >= n) {
        krow[j] = krow[n - 1];
        vrow[j] = vrow[n - 1];
        continue;
      }
      const int64_t pos = keys[j];
      krow[j] = as_float(k_base + pos * pb.k_ss, kbuf.data() + static_cast<size_t>(j) * headdim, headdim);
      vrow[j] = as_float(v_base + pos * pb.v_ss, vbuf.data() + static_cast<size_t>(j) * headdim, headdim);
    }
    const int n_scored = (n + KR - 1) / KR * KR;
    score_tile(nq, qt.data(), headdim, krow, n_scored, st.data());
    online_softmax(pb, st.data(), keys, listed, n, n_scored, p0, needs_mask, m.data(), l.data(), alpha.data(), nq);
    const int rows_padded = (rows + R - 1) / R * R;
    for (int r = 0; r < rows_padded; r += R)
      for (int d = 0; d < headdim; d += NV * W)
        accumulate_chunk(std::min(NV, (headdim - d) / W), st.data() + r, alpha.data() + r, vrow, d, n,
                         o.data() + static_cast<size_t>(r) * headdim, headdim);
  }
};
using F32Engine = F32EngineT<float>;

#ifdef LONGATTN_AVX512BF16
// ---- bfloat16 dot products (AVX512-BF16) -------------------------------------
//
// vdpbf16ps multiplies pairs of bf16 and adds both products into a float32
// lane: acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1], 32 products per instruction
// (twice an fp32 FMA's work). A product of two bf16 is exact in float32, so
// the scores Q K^T lose nothing but the float32 sums'; q is kept unscaled
// (scaling it would round it) and the scores are scaled after the sum. For
// P V the probabilities are rounded to bf16 (relative error <= 2^-9 per
// weight, independent across keys; flash-attention rounds P to the input
// type on GPUs too) while the row sums l use the float32 P; V stays exact.
// Pairs run along the reduction: head-dim pairs for scores (a K row's two
// consecutive bf16 are one 32-bit word, broadcast straight from memory;
// Qt2 holds (q[r][2t], q[r][2t+1]) words), key pairs for P V (V rows 2t and
// 2t+1 interleaved per tile into Vp[t][d] = (v[2t][d], v[2t+1][d]), and P
// words (p[2t][r], p[2t+1][r])).

inline uint32_t load_word(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// 16 words whose low halves are a's 16 bf16 and high halves b's.
inline __m512i interleave_bf16(__m256i a, __m256i b) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// St[j][0..NQA*W) = scale * sum_d K[j][d] Q[0..NQA*W)[d] for KR keys (NQA <= NQ row vectors).
template <int NQA>
inline void score_keys_bf16(const uint32_t* qt2, int headdim, const uint16_t* const* krow, float scale, float* st) {
  __m512 acc[KR][NQA];
  for (int j = 0; j < KR; ++j)
    for (int c = 0; c < NQA; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int t = 0; t < headdim / 2; ++t) {
    __m512bh qv[NQA];
    for (int c = 0; c < NQA; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qt2 + t * BM + c * W);
    for (int j = 0; j < KR; ++j) {
      const __m512bh kv = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_word(krow[j] + 2 * t)));
      for (int c = 0; c < NQA; ++c) acc[j][c] = _mm512_dpbf16_ps(acc[j][c], kv, qv[c]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int j = 0; j < KR; ++j)
    for (int c = 0; c < NQA; ++c) _mm512_storeu_ps(st + j * BM + c * W, _mm512_mul_ps(acc[j][c], s));
}

// The tile's scores with the item's nq row vectors (st rows of stride BM).
inline void score_tile_bf16(int nq, const uint32_t* qt2, int headdim, const uint16_t* const* krow, int n_scored,
                            float scale, float* st) {
  static_assert(NQ == 3, "score_tile_bf16 dispatches 1..3 row vectors");
  for (int j = 0; j < n_scored; j += KR) {
    switch (nq) {
      case 1: score_keys_bf16<1>(qt2, headdim, krow + j, scale, st + j * BM); break;
      case 2: score_keys_bf16<2>(qt2, headdim, krow + j, scale, st + j * BM); break;
      default: score_keys_bf16<3>(qt2, headdim, krow + j, scale, st + j * BM); break;
    }
  }
}

// O[r][d0..d0+NVD*W) = alpha[r] O[r][..] + sum_{t<pairs} P-pair[t][r] . V-pair[t][d0..] for R rows.
template <int NVD>
inline void accumulate_values_bf16(const uint32_t* pw, const float* alpha, const uint32_t* vp, int d0, int pairs,
                                   float* o, int headdim) {
  __m512 acc[R][NVD];
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < NVD; ++c) acc[r][c] = _mm512_mul_ps(a, _mm512_loadu_ps(o + r * headdim + d0 + c * W));
  }
  for (int t = 0; t < pairs; ++t) {
    __m512bh vv[NVD];
    for (int c = 0; c < NVD; ++c)
      vv[c] = (__m512bh)_mm512_loadu_si512(vp + static_cast<size_t>(t) * headdim + d0 + c * W);
    for (int r = 0; r < R; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pw[t * BM + r]));
      for (int c = 0; c < NVD; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NVD; ++c) _mm512_storeu_ps(o + r * headdim + d0 + c * W, acc[r][c]);
}

void accumulate_chunk_bf16(int nvd, const uint32_t* pw, const float* alpha, const uint32_t* vp, int d0, int pairs,
                           float* o, int headdim) {
  switch (nvd) {
    case 4: accumulate_values_bf16<4>(pw, alpha, vp, d0, pairs, o, headdim); break;
    case 3: accumulate_values_bf16<3>(pw, alpha, vp, d0, pairs, o, headdim); break;
    case 2: accumulate_values_bf16<2>(pw, alpha, vp, d0, pairs, o, headdim); break;
    default: accumulate_values_bf16<1>(pw, alpha, vp, d0, pairs, o, headdim); break;
  }
}

// One pair of V rows as words dst[d] = (v0[d], v1[d]), head dims in order.
inline void pair_rows_in_order(const uint16_t* v0, const uint16_t* v1, int headdim, uint32_t* dst) {
  for (int d = 0; d < headdim; d += W)
    _mm512_storeu_si512(dst + d, interleave_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + d))));
}

// V rows of a tile's key pairs as pair words: pair_rows(v[keys[2t]], v[keys[2t+1]], headdim, vp + t * headdim)
// for t < (n + 1) / 2, an odd n's last key paired with zero_row; returns that number of pairs. pair_rows
// sets the word order within a row (pair_rows_in_order here; the AMX engine's own order in flash_amx.h).
template <class PairRows>
inline int interleave_value_pairs(const uint16_t* v_base, int64_t v_ss, const int64_t* keys, int n, int headdim,
                                  const uint16_t* zero_row, uint32_t* vp, PairRows pair_rows) {
  const int pairs = (n + 1) / 2;
  for (int t = 0; t < pairs; ++t)
    pair_rows(v_base + keys[2 * t] * v_ss, 2 * t + 1 < n ? v_base + keys[2 * t + 1] * v_ss : zero_row, headdim,
              vp + static_cast<size_t>(t) * headdim);
  return pairs;
}

// bf16 inputs (uint16_t bits), bf16 dot products, float32 softmax and accumulators.
struct Bf16DotEngine : RowState {
  std::vector<uint32_t> qt2, pw;   // (headdim/2, BM) q words; (BN/2, BM) P words
  SharedTile* vp;                  // (BN/2, headdim) V words, shared by the item's blocks
  std::vector<uint16_t> zero_row;  // the partner of an odd tile's last V row
  Bf16DotEngine(int headdim, SharedTile* shared)
      : RowState(headdim), qt2(static_cast<size_t>(headdim / 2) * BM), pw(BN / 2 * BM), vp(shared),
        zero_row(headdim, 0) {
    vp->words.resize(static_cast<size_t>(BN / 2) * headdim);
  }

  void begin(const Problem& pb, const Seq& sq, int h, int first_row, int rows) {
    for (int r = 0; r < BM; ++r) {
      const uint16_t* qrow = query_row<uint16_t>(pb, sq, h, first_row, r, rows);
      for (int t = 0; t < pb.headdim / 2; ++t) qt2[t * BM + r] = r < rows ? load_word(qrow + 2 * t) : 0u;
    }
    reset(rows);
  }

  void tile(const Problem& pb, const Seq& sq, int kv_head, const int64_t* keys, const uint8_t* listed, int n,
            int rows, int64_t p0, bool needs_mask) {
    const int headdim = pb.headdim;
    const uint16_t* k_base = head_rows<uint16_t>(sq.k, pb.k_sh, kv_head);
    const uint16_t* v_base = head_rows<uint16_t>(sq.v, pb.v_sh, kv_head);
    const uint16_t* krow[BN];
    for (int j = 0; j < BN; ++j) krow[j] = k_base + keys[std::min(j, n - 1)] * pb.k_ss;  // past n: masked
    const int n_scored = (n + KR - 1) / KR * KR;
    score_tile_bf16(nq, qt2.data(), headdim, krow, n_scored, pb.scale, st.data());
    online_softmax(pb, st.data(), keys, listed, n, n_scored, p0, needs_mask, m.data(), l.data(), alpha.data(), nq);
    // Key pairs: V rows interleaved, P rounded to bf16 and interleaved (keys past n have P = 0).
    const int pairs = (n + 1) / 2;
    if (!vp->holds(v_base, keys, n)) {
      interleave_value_pairs(v_base, pb.v_ss, keys, n, headdim, zero_row.data(), vp->words.data(),
                             pair_rows_in_order);
      vp->hold(v_base, keys, n);
    }
    for (int t = 0; t < pairs; ++t) {
      for (int c = 0; c < NQ; ++c) {  // every vector: P words past nq are 0 (stale ones would reach P V)
        const __m256i p_even = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(st.data() + 2 * t * BM + c * W));
        const __m256i p_odd = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(st.data() + (2 * t + 1) * BM + c * W));
        _mm512_storeu_si512(pw.data() + t * BM + c * W, interleave_bf16(p_even, p_odd));
      }
    }
    const int rows_padded = (rows + R - 1) / R * R;
    for (int r = 0; r < rows_padded; r += R)
      for (int d = 0; d < headdim; d += NV * W)
        accumulate_chunk_bf16(std::min(NV, (headdim - d) / W), pw.data() + r, alpha.data() + r, vp->words.data(), d,
                              pairs, o.data() + static_cast<size_t>(r) * headdim, headdim);
  }
};
#endif  // LONGATTN_AVX512BF16

// The AMX engine: real tiles where the compiler targets AMX, or their software
// emulation (-DLONGATTN_AMX_EMULATE) on any AVX512-BF16 build. flash_amx.h
// includes system headers, so it is included at file scope.
#if defined(LONGATTN_AVX512BF16) && ((defined(__AMX_TILE__) && defined(__AMX_BF16__)) || defined(LONGATTN_AMX_EMULATE))
#define LONGATTN_AMX 1
}  // namespace
#include "flash_amx.h"
namespace {
#endif

// Which arithmetic a call asks for (the `math` argument of the entry points).
// kMathF32Bf16 / kMathF32Fp16: float32 arithmetic on bfloat16 / float16
// inputs widened per tile (the "fp32" engine for half inputs).
enum Math { kMathF32 = 0, kMathBf16Dot = 1, kMathAmx = 2, kMathF32Bf16 = 3, kMathF32Fp16 = 4 };

constexpr int kMathsBuilt = (1 << kMathF32) | (1 << kMathF32Bf16) | (1 << kMathF32Fp16)
#ifdef LONGATTN_AVX512BF16
                            | (1 << kMathBf16Dot)
#endif
#ifdef LONGATTN_AMX
                            | (1 << kMathAmx)
#endif
    ;

// Runs items with the engine `math` names (item(it, crew): see run_items); false when this build lacks it.
template <class Item>
bool run_with_math(int math, int64_t items, int group, int headdim, int num_threads, const Item& item) {
  switch (math) {
    case kMathF32: run_items<F32Engine>(items, group, headdim, num_threads, item); return true;
    case kMathF32Bf16: run_items<F32EngineT<uint16_t>>(items, group, headdim, num_threads, item); return true;
    case kMathF32Fp16: run_items<F32EngineT<_Float16>>(items, group, headdim, num_threads, item); return true;
#ifdef LONGATTN_AVX512BF16
    case kMathBf16Dot: run_items<Bf16DotEngine>(items, group, headdim, num_threads, item); return true;
#endif
#ifdef LONGATTN_AMX
    case kMathAmx: run_items<AmxEngine>(items, group, headdim, num_threads, item); return true;
#endif
    default: return false;
  }
}

}  // namespace
#endif  // LONGATTN_AVX2

// The vector width in floats the kernel was built with; 0: no AVX2 (the kernel is unavailable).
extern "C" int longattn_flash_cpu_lanes() {
#ifdef LONGATTN_AVX2
  return Isa::W;
#else
  return 0;
#endif
}

// Bit m set: this build has math m (0 float32 FMAs, 1 bf16 dot products, 2 AMX tiles, 3 and 4 float32
// FMAs on bf16 and fp16 inputs); 0 without AVX2.
extern "C" int longattn_flash_cpu_maths() {
#ifdef LONGATTN_AVX2
  return kMathsBuilt;
#else
  return 0;
#endif
}

// q, k, v are float32 for math 0, bfloat16 bits for maths 1, 2 and 3, float16 for math 4; out
// is float32 either way. Returns 0, or 1 for arguments it cannot take, 2
// when built without AVX2, 3 when built without the math asked for.
extern "C" int longattn_flash_cpu(
    const void* q, int64_t q_sb, int64_t q_ss, int64_t q_sh,
    const void* k, int64_t k_sb, int64_t k_ss, int64_t k_sh,
    const void* v, int64_t v_sb, int64_t v_ss, int64_t v_sh,
    float* out, int64_t o_sb, int64_t o_ss, int64_t o_sh, float* lse,
    int batch, int seqlen_q, int seqlen_k, int nheads, int nheads_k, int headdim,
    int window_left, int window_right, int sink, int causal, float scale, float softcap,
    const int32_t* listed, int listed_per_block, int block_q, int math, int num_threads) {
#ifdef LONGATTN_AVX2
  if (batch < 1 || seqlen_q < 1 || seqlen_k < 0 || nheads_k < 1 || nheads % nheads_k || headdim < W ||
      headdim % W || sink < 0 || num_threads < 1 || (listed != nullptr && (block_q < 1 || listed_per_block < 0)))
    return 1;
  if (math < 0 || math > 30 || !((kMathsBuilt >> math) & 1)) return 3;
  const int es = math == kMathF32 ? 4 : 2;  // bytes per input element
  // Items never straddle two query blocks of a listing: each block of block_q
  // rows splits into pieces of at most BM rows.
  const int bq = listed == nullptr ? BM : block_q;
  const Problem pb{q_ss, q_sh, k_ss, k_sh, v_ss, v_sh, o_ss, o_sh, nheads, nheads_k, headdim, window_left,
                   window_right, sink, causal != 0, scale, softcap, listed_per_block, bq};
  const int blocks = (seqlen_q + bq - 1) / bq, pieces = (bq + BM - 1) / BM;
  // Work items: up to `group` consecutive pieces (of BM rows) of one (batch, head), walked together.
  const int64_t units = static_cast<int64_t>(blocks) * pieces;
  const int group = group_size(static_cast<int64_t>(batch) * nheads * units, num_threads);
  const int64_t groups = (units + group - 1) / group;
  const int64_t items = static_cast<int64_t>(batch) * nheads * groups;
  const char *qb = static_cast<const char*>(q), *kb = static_cast<const char*>(k), *vb = static_cast<const char*>(v);
  run_with_math(math, items, group, headdim, num_threads, [&](int64_t it, auto& crew) {
    const int64_t first_unit = (it % groups) * group;
    const int h = static_cast<int>((it / groups) % nheads);
    const int64_t b = it / groups / nheads;
    RowBlock rb[kGroup];
    int count = 0;
    for (int64_t u = first_unit; u < std::min(units, first_unit + group); ++u) {
      const int piece = static_cast<int>(u % pieces), block = static_cast<int>(u / pieces);
      const int first_row = block * bq + piece * BM;
      const int rows = std::min({BM, bq - piece * BM, seqlen_q - first_row});
      if (rows > 0) rb[count++] = RowBlock{block, first_row, rows};
    }
    if (count == 0) return;
    const Seq sq{qb + b * q_sb * es, kb + b * k_sb * es, vb + b * v_sb * es, out + b * o_sb,
                 lse + b * nheads * seqlen_q, seqlen_q,
                 listed == nullptr ? nullptr : listed + b * nheads * blocks * listed_per_block,
                 seqlen_q, seqlen_k};
    work_item(pb, crew, sq, h, rb, count);
  });
  return 0;
#else
  (void)q; (void)q_sb; (void)q_ss; (void)q_sh; (void)k; (void)k_sb; (void)k_ss; (void)k_sh; (void)v; (void)v_sb;
  (void)v_ss; (void)v_sh; (void)out; (void)o_sb; (void)o_ss; (void)o_sh; (void)lse; (void)batch; (void)seqlen_q;
  (void)seqlen_k; (void)nheads; (void)nheads_k; (void)headdim; (void)window_left; (void)window_right; (void)sink;
  (void)causal; (void)scale; (void)softcap; (void)listed; (void)listed_per_block; (void)block_q; (void)math;
  (void)num_threads;
  return 2;
#endif
}

// Varlen (packed sequences, flash-attn's flash_attn_varlen_func layout):
//   q, out (total_q, nheads, headdim); k, v (total_k, nheads_k, headdim); lse (nheads, total_q) contiguous;
//   cu_seqlens_q, cu_seqlens_k (batch + 1) int32 prefix sums: sequence b's queries are rows
//   cu_seqlens_q[b] .. cu_seqlens_q[b + 1], its keys rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1],
//   and its query i sits at key position i + seqlen_k_b - seqlen_q_b (each sequence aligned on its own).
// Work items are (sequence, head, a group of blocks of BM query rows), numbered
// sequence by sequence; each block is exactly the dense kernel's block on that
// sequence alone (same bits); no padding to the longest sequence. Sequences of length 0 (either
// side) are allowed: no queries, no items; no keys, rows out 0 and lse -inf.
// Input types and `math` as longattn_flash_cpu. Returns 0, or 1 for arguments
// it cannot take (prefix sums included), 2 when built without AVX2, 3 without the math.
extern "C" int longattn_flash_cpu_varlen(
    const void* q, int64_t q_ss, int64_t q_sh,
    const void* k, int64_t k_ss, int64_t k_sh,
    const void* v, int64_t v_ss, int64_t v_sh,
    float* out, int64_t o_ss, int64_t o_sh, float* lse,
    const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, int batch, int64_t total_q, int64_t total_k,
    int nheads, int nheads_k, int headdim, int window_left, int window_right, int sink, int causal, float scale,
    float softcap, int math, int num_threads) {
#ifdef LONGATTN_AVX2
  if (batch < 1 || total_q < 0 || total_k < 0 || nheads < 1 || nheads_k < 1 || nheads % nheads_k ||
      headdim < W || headdim % W || sink < 0 || num_threads < 1 || cu_seqlens_q == nullptr ||
      cu_seqlens_k == nullptr || cu_seqlens_q[0] != 0 || cu_seqlens_k[0] != 0 || cu_seqlens_q[batch] != total_q ||
      cu_seqlens_k[batch] != total_k)
    return 1;
  if (math < 0 || math > 30 || !((kMathsBuilt >> math) & 1)) return 3;
  const int es = math == kMathF32 ? 4 : 2;
  // Work items: up to `group` consecutive blocks of BM rows of one (sequence, head), walked together.
  // first_item[b]: the number of the sequence's first item (a prefix sum over
  // sequences of nheads * its groups of blocks); an item finds its sequence by bisection.
  std::vector<int64_t> blocks_of(static_cast<size_t>(batch));  // blocks of BM query rows per sequence
  int64_t units = 0;
  for (int b = 0; b < batch; ++b) {
    const int64_t sq = static_cast<int64_t>(cu_seqlens_q[b + 1]) - cu_seqlens_q[b];
    const int64_t sk = static_cast<int64_t>(cu_seqlens_k[b + 1]) - cu_seqlens_k[b];
    if (sq < 0 || sk < 0) return 1;
    blocks_of[b] = (sq + BM - 1) / BM;
    units += nheads * blocks_of[b];
  }
  const int group = group_size(units, num_threads);
  std::vector<int64_t> first_item(static_cast<size_t>(batch) + 1, 0);
  for (int b = 0; b < batch; ++b) first_item[b + 1] = first_item[b] + nheads * ((blocks_of[b] + group - 1) / group);
  const Problem pb{q_ss, q_sh, k_ss, k_sh, v_ss, v_sh, o_ss, o_sh, nheads, nheads_k, headdim, window_left,
                   window_right, sink, causal != 0, scale, softcap, 0, BM};
  const char *qb = static_cast<const char*>(q), *kb = static_cast<const char*>(k), *vb = static_cast<const char*>(v);
  run_with_math(math, first_item[batch], group, headdim, num_threads, [&](int64_t it, auto& crew) {
    // The last sequence whose first item is <= it (sequences without queries own no items).
    const int b = static_cast<int>(std::upper_bound(first_item.begin(), first_item.end(), it) - first_item.begin()) - 1;
    const int64_t q0 = cu_seqlens_q[b], k0 = cu_seqlens_k[b];
    const int seqlen_q = cu_seqlens_q[b + 1] - cu_seqlens_q[b], seqlen_k = cu_seqlens_k[b + 1] - cu_seqlens_k[b];
    const int blocks = static_cast<int>(blocks_of[b]), groups = (blocks + group - 1) / group;
    const int64_t local = it - first_item[b];
    const int h = static_cast<int>(local / groups), first_block = static_cast<int>(local % groups) * group;
    RowBlock rb[kGroup];
    int count = 0;
    for (int block = first_block; block < std::min(blocks, first_block + group); ++block)
      rb[count++] = RowBlock{block, block * BM, std::min(BM, seqlen_q - block * BM)};
    const Seq sq{qb + q0 * q_ss * es, kb + k0 * k_ss * es, vb + k0 * v_ss * es, out + q0 * o_ss, lse + q0, total_q,
                 nullptr, seqlen_q, seqlen_k};
    work_item(pb, crew, sq, h, rb, count);
  });
  return 0;
#else
  (void)q; (void)q_ss; (void)q_sh; (void)k; (void)k_ss; (void)k_sh; (void)v; (void)v_ss; (void)v_sh; (void)out;
  (void)o_ss; (void)o_sh; (void)lse; (void)cu_seqlens_q; (void)cu_seqlens_k; (void)batch; (void)total_q;
  (void)total_k; (void)nheads; (void)nheads_k; (void)headdim; (void)window_left; (void)window_right; (void)sink;
  (void)causal; (void)scale; (void)softcap; (void)math; (void)num_threads;
  return 2;
#endif
}
