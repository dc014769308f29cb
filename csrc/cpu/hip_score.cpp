// HiP's tree search on the CPU: for every (batch, head, query block) row,
// every round of halving, scoring (the max of q . k over the row's strided
// queries and a block's searchable keys) and keeping the best branches,
// in one call (the PyTorch twin is longattn/sparse/hip_mask.py). Keys are read in place (no
// gather); each row's strided queries are read from q in place too and held
// transposed, (headdim, S), in the row's own buffer (16 KiB at D = 128,
// S = 32: built in L1, where a transposed copy of every row made in PyTorch
// cost more than it should), so one key row updates S query lanes with
// broadcast FMAs and no horizontal sums; the max over the lanes is taken
// once per block. Candidates are scored 4 blocks at a time
// (max_over_keys: 8 keys share each load of the query lanes; at 64k 1.3x
// faster in fp32 and ~1.2x in bf16 than block by block, Zen 4, same process).
// A half whose centre block is its group's centre is not scored again (it
// was, as that group, the round before: RowSearch::known_score): the last
// round of a full-length row and every round of a group already one block
// long; at 64k the fp32 search took ~12% less time (bf16 ~5%; Zen 4, A/B in
// one process), same selection.
//
// Layouts (contiguous):
//   q           float32 (bfloat16 bits for longattn_hip_search_bf16) queries:
//               query i of batch b, head h is the q_dim elements at
//               b * q_sb + i * q_ss + h * q_sh (element strides); q_dim <= D.
//               The bf16 entry (AVX512-BF16 builds) pairs them, (q[2t], q[2t+1])
//               per 32-bit word (an odd q_dim's last word padded with zero), D even;
//               keys bfloat16 rows of D, scored with vdpbf16ps, or on AMX tiles
//               where the build targets them and the OS grants AMX state
//               (amx_batch_scores; bf16 products exact in float32, float32 sums).
//   query_pos   (nqb, S) int32: key position of each strided query of query
//               block qb, i.e. its row i = query_pos - q_offset in q; S a
//               multiple of the vector width (callers pad by repeating a query)
//   range_end   (nqb,)  int64: last searchable key of query block qb
//   keys        float32 rows of D; key (b, pos, hk) is row
//               b * batch_stride + hk * head_stride + pos * pos_stride, or, with
//               block_table (batch, bt_stride) int64 (a paged cache),
//               (block_table[b][pos / page_size] * page_size + pos % page_size) * pos_stride
//               + hk * head_stride. Callers pass keys laid out (batch, nheads_k, positions,
//               D) when they can: a block's keys are then adjacent in memory.
//   starts/ends (rows, nb) int64: the groups, in and out (keys of a block past
//               the searchable range are never read); out, ordered by start
//               with empty groups (start == end) last
// Row r is (b, h, qb) = (r / (nheads * nqb), (r / nqb) % nheads, r % nqb);
// head h reads kv head h / (nheads / nheads_k).
// A key at position p counts iff sink <= p <= range_end[qb]; with causal, for
// query lane s only if p <= query_pos[qb][s]. No key counted: -inf.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

// bf16 scored on AMX tiles where the compiler targets them (or, for the
// tests, on their emulation, -DLONGATTN_AMX_EMULATE, in any AVX512-BF16
// build): see amx_batch_scores. amx_tiles.h opens its own namespace.
#if defined(LONGATTN_AVX512BF16) && ((defined(__AMX_TILE__) && defined(__AMX_BF16__)) || defined(LONGATTN_AMX_EMULATE))
#define LONGATTN_AMX_SEARCH 1
#include "amx_tiles.h"
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct ScoreProblem {
  const void* q; int64_t q_sb, q_ss, q_sh, q_offset; int q_dim;
  const int32_t* query_pos; const int64_t* range_end;
  const void* keys; int64_t batch_stride, head_stride, pos_stride;
  const int64_t* block_table; int64_t bt_stride; int page_size;
  int64_t rows; int S, D, bk, sink, causal, nheads, nheads_k, nqb;
  bool bf16;  // queries as bf16 pair words, keys bf16 (the _bf16 entry)
  bool amx;   // bf16 scored on AMX tiles (amx_batch_scores)
};

// AMX tiles take 32 bf16 head dims a step: the head dim the tiles see (zeros past D).
int amx_headdim(int D) { return (D + 31) / 32 * 32; }

// Key `pos` of batch b, kv head hk; T is the keys' element type (float, or bf16 bits as uint16_t).
template <class T = float>
inline const T* key_at(const ScoreProblem& p, int64_t b, int hk, int64_t pos) {
  const int64_t row = p.block_table == nullptr
      ? b * p.batch_stride + pos * p.pos_stride
      : (p.block_table[b * p.bt_stride + pos / p.page_size] * p.page_size + pos % p.page_size) * p.pos_stride;
  return static_cast<const T*>(p.keys) + (row + hk * p.head_stride) * p.D;
}

// One block's score without the vector path (float32 keys; a build without
// AVX2, or S not a multiple of the vector width): max over the row's strided
// queries and the block's searchable keys from first_pos.
float score_block_scalar(const ScoreProblem& p, const float* qt, const int32_t* qpos, int64_t end,
                         int64_t b, int hk, int64_t first_pos) {
  float best = kNegInf;
  for (int t = 0; t < p.bk; ++t) {
    const int64_t pos = first_pos + t;
    if (pos < p.sink || pos > end) continue;
    const float* k = key_at(p, b, hk, pos);
    for (int s = 0; s < p.S; ++s) {
      if (p.causal && pos > qpos[s]) continue;
      float dot = 0.0f;
      for (int d = 0; d < p.D; ++d) dot += qt[static_cast<int64_t>(d) * p.S + s] * k[d];
      best = std::max(best, dot);  // a NaN dot product is passed over (best < NaN is false)
    }
  }
  return best;
}

// Lines of key rows to prefetch while a batch of candidate blocks is scored:
// one per step of the d loop, in order, the steps after the last line
// touching a line already in L1. Issued all at once (32-64 lines a batch),
// they filled the core's miss buffers and the prefetches themselves stalled:
// ~13% of the search's samples sat on them (Intel Xeon, 64k, float32).
struct Spread {
  const char* const* touch;  // the lines from touch[0], then lines in L1, for every step of a batch
  int count;                 // the lines

  // touch for a batch of `steps` steps; lines beyond one per step are prefetched at once.
  const char* const* plan(int steps) const {
    for (int i = steps; i < count; ++i) prefetch_l2(touch[i]);
    return touch;
  }
};

#ifdef LONGATTN_AVX2
// Keys scored per pass over the query lanes (NK), by the lanes' vector
// count NV: at least 6-8 independent FMA chains (NV * NK accumulators), and
// the accumulators, NV query vectors and a key broadcast within the register
// file (32 vectors with AVX-512, 16 with AVX2).
template <int NV>
constexpr int keys_per_pass() {
#ifdef LONGATTN_AVX512
  return NV <= 2 ? 8 : 4;
#else
  return NV == 1 ? 8 : NV == 2 ? 4 : 2;
#endif
}

// Scores of a list of nk keys of several candidate blocks (kp: rows, kpos:
// positions, owner: the block's index into best) against NV vectors of query
// lanes from s0, each key's max over the lanes into best[owner]: NK keys
// share each load of the query lanes (scored block by block, 2 keys per
// block, the lanes were loaded once per 2 keys). T: float32 keys and query
// lanes, or (AVX512-BF16) bf16 keys as uint16_t against query pair words,
// one vdpbf16ps per head-dim pair (D even).
//
// Meanwhile the lines of later blocks (ahead) are prefetched, one per step
// of the d loop (Spread).
template <int NV, class T = float>
void max_over_keys(const ScoreProblem& p, const void* qt, const int32_t* qpos, int s0, const void* const* kp,
                   const int64_t* kpos, const int* owner, int nk, typename Isa::vec (*best)[NV], Spread ahead) {
  using V = Isa;
  constexpr bool kF32 = std::is_same_v<T, float>;
  using Lane = std::conditional_t<kF32, float, uint32_t>;  // a query lane's element: a float, or a bf16 pair word
  constexpr int NK = keys_per_pass<NV>();
  const int steps = kF32 ? p.D : p.D / 2, S = p.S;
  const Lane* q = static_cast<const Lane*>(qt);
  const char* const* touch = ahead.plan((nk + NK - 1) / NK * steps);
  for (int j0 = 0; j0 < nk; j0 += NK, touch += steps) {
    const int m = std::min(NK, nk - j0);
    const T* k[NK];
    for (int u = 0; u < NK; ++u) k[u] = static_cast<const T*>(kp[j0 + std::min(u, m - 1)]);  // past m: the last key again, unused
    // Every loop over v and u is unrolled (compile-time bounds): with a
    // run-time index gcc keeps `a` in memory and stores each accumulator on
    // every step of the d loop.
    typename V::vec a[NV][NK];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
#pragma GCC unroll 8
      for (int u = 0; u < NK; ++u) a[v][u] = V::zero();
    for (int d = 0; d < steps; ++d) {
      prefetch_l2(touch[d]);
      const Lane* qd = q + static_cast<int64_t>(d) * S + s0;
      if constexpr (kF32) {
        typename V::vec x[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) x[v] = V::load(qd + v * V::W);
#pragma GCC unroll 8
        for (int u = 0; u < NK; ++u) {
          const typename V::vec kd = V::set1(k[u][d]);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) a[v][u] = V::fma(x[v], kd, a[v][u]);
        }
      } else {
#ifdef LONGATTN_AVX512BF16
        __m512bh x[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) x[v] = (__m512bh)_mm512_loadu_si512(qd + v * 16);
#pragma GCC unroll 8
        for (int u = 0; u < NK; ++u) {
          uint32_t word;
          std::memcpy(&word, k[u] + 2 * d, 4);
          const __m512bh kd = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) a[v][u] = _mm512_dpbf16_ps(a[v][u], kd, x[v]);
        }
#endif
      }
    }
#pragma GCC unroll 8
    for (int u = 0; u < NK; ++u)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        if (u >= m) continue;
        typename V::vec sum = a[v][u];
        if (p.causal) sum = V::drop_after(sum, qpos + s0 + v * V::W, static_cast<int32_t>(kpos[j0 + u]));
        // sum first: max_ps returns its second operand when either is NaN,
        // so a NaN dot product (NaN in q or k) is passed over, as every twin
        // does (best itself never holds NaN), at no cost.
        best[owner[j0 + u]][v] = V::max(sum, best[owner[j0 + u]][v]);
      }
  }
}
#endif

// One (batch, head, query block) row: its transposed strided queries and where its keys are.
struct RowContext {
  const void* qt; const int32_t* qpos; int64_t b; int h, hk; int64_t end;  // qt: float rows, or bf16 pair words
};

// 32-bit words of row r's transposed strided queries: (D, S) floats, or (D / 2, S) bf16 pair words.
// With AMX, rows of zero words pad the head dim to amx_headdim (B tiles read 16 pairs a step).
size_t transposed_words(const ScoreProblem& p) {
  return static_cast<size_t>(p.amx ? amx_headdim(p.D) / 2 : p.bf16 ? p.D / 2 : p.D) * p.S;
}

// The row's strided queries, read from q, transposed into qt (transposed_words
// words); head dims past q_dim are zero (they add nothing to a dot product).
void transpose_queries(const ScoreProblem& p, const RowContext& row, uint32_t* qt) {
  const int steps = p.bf16 ? p.D / 2 : p.D;
  for (int s = 0; s < p.S; ++s) {
    const int64_t at = row.b * p.q_sb + (row.qpos[s] - p.q_offset) * p.q_ss + row.h * p.q_sh;
    if (p.bf16) {
      const uint16_t* q = static_cast<const uint16_t*>(p.q) + at;
      for (int t = 0; t < steps; ++t) {
        const uint32_t lo = 2 * t < p.q_dim ? q[2 * t] : 0, hi = 2 * t + 1 < p.q_dim ? q[2 * t + 1] : 0;
        qt[static_cast<size_t>(t) * p.S + s] = lo | (hi << 16);
      }
    } else {
      const float* q = static_cast<const float*>(p.q) + at;
      for (int d = 0; d < steps; ++d) {
        const float x = d < p.q_dim ? q[d] : 0.0f;
        std::memcpy(&qt[static_cast<size_t>(d) * p.S + s], &x, 4);
      }
    }
  }
}

RowContext row_context(const ScoreProblem& p, int64_t r, const uint32_t* qt) {
  const int64_t b = r / (static_cast<int64_t>(p.nheads) * p.nqb);
  const int h = static_cast<int>((r / p.nqb) % p.nheads), qb = static_cast<int>(r % p.nqb);
  return {qt, p.query_pos + static_cast<int64_t>(qb) * p.S, b, h, h / (p.nheads / p.nheads_k), p.range_end[qb]};
}

#ifdef LONGATTN_AVX2
// Candidate blocks scored together: their keys share each load of the query
// lanes (max_over_keys).
constexpr int kBlocksPerBatch = 4;  // 8 keys of 2-key blocks: one pass of max_over_keys (6 or 8 blocks: slower)

// NV vectors of query lanes from s0 against the batch's key list; each
// block's max over them into score[i].
template <int NV, class T>
void batch_tile(const ScoreProblem& p, const void* qt, const int32_t* qpos, int s0, const void* const* kp,
                const int64_t* kpos, const int* owner, int nk, int n, float* score, Spread ahead) {
  typename Isa::vec best[kBlocksPerBatch][NV];
  for (int i = 0; i < n; ++i)
    for (int v = 0; v < NV; ++v) best[i][v] = Isa::set1(kNegInf);
  max_over_keys<NV, T>(p, qt, qpos, s0, kp, kpos, owner, nk, best, ahead);
  for (int i = 0; i < n; ++i) {
    typename Isa::vec m = best[i][0];
    for (int v = 1; v < NV; ++v) m = Isa::max(m, best[i][v]);
    score[i] = std::max(score[i], Isa::hmax(m));
  }
}

// The s0 chunks of the query lanes (4 vectors at a time, then 3, 2 or 1);
// the first one prefetches `ahead`.
template <class T>
void batch_tiles(const ScoreProblem& p, const RowContext& row, const void* const* kp, const int64_t* kpos,
                 const int* owner, int nk, int n, float* score, Spread ahead) {
  constexpr int L = Isa::W;
  int s0 = 0;
  for (; s0 + 4 * L <= p.S; s0 += 4 * L, ahead.count = 0)
    batch_tile<4, T>(p, row.qt, row.qpos, s0, kp, kpos, owner, nk, n, score, ahead);
  switch ((p.S - s0) / L) {
    case 3: batch_tile<3, T>(p, row.qt, row.qpos, s0, kp, kpos, owner, nk, n, score, ahead); break;
    case 2: batch_tile<2, T>(p, row.qt, row.qpos, s0, kp, kpos, owner, nk, n, score, ahead); break;
    case 1: batch_tile<1, T>(p, row.qt, row.qpos, s0, kp, kpos, owner, nk, n, score, ahead); break;
    default: break;
  }
}

#ifdef LONGATTN_AMX_SEARCH
// Keys per AMX batch: the rows of a tile (a batch holds as many whole blocks
// as fit, at least one; a longer block goes through in pieces of 16 keys).
constexpr int kAmxKeys = 16;
int amx_blocks_per_batch(int bk) { return std::max(1, kAmxKeys / bk); }

// The tiles: C 0..3 (16 keys x 16 query lanes, fp32), A 4 (16 keys x 32 head
// dims, bf16), B 5 and 6 by turns (16 head-dim pairs x 16 query lanes): every
// tile 16 rows x 64 bytes, one configuration (palette 1) for the thread.
struct AmxTiles {
  explicit AmxTiles(bool on) : on_(on) {
    if (!on_) return;
    amx::Config config;
    for (int t = 0; t < 7; ++t) {
      config.rows[t] = 16;
      config.colsb[t] = 64;
    }
    amx::configure(config);
  }
  ~AmxTiles() {
    if (on_) amx::release();
  }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;

 private:
  bool on_;
};

// C tile G += keys (A, tile 4) x query lanes of group G (B, tiles 5 and 6 by
// turns: the row's pair words from qs + 16 G, rows `pair_stride` bytes apart).
template <int G>
inline void amx_group(const uint32_t* qs, int64_t pair_stride) {
  static_assert(G >= 0 && G < 4, "four C tiles");
  if constexpr (G == 0) { amx::load<5>(qs, pair_stride); amx::dp_bf16<0, 4, 5>(); }
  if constexpr (G == 1) { amx::load<6>(qs + 16, pair_stride); amx::dp_bf16<1, 4, 6>(); }
  if constexpr (G == 2) { amx::load<5>(qs + 32, pair_stride); amx::dp_bf16<2, 4, 5>(); }
  if constexpr (G == 3) { amx::load<6>(qs + 48, pair_stride); amx::dp_bf16<3, 4, 6>(); }
}

// The bf16 batch on AMX tiles (p.amx): score[i] = max(score[i], the max over
// the row's query lanes and block i's keys); kp, kpos, owner as for
// max_over_keys. Per 16 keys: the key rows are copied into kbuf (16 rows of
// amx_headdim(D) bf16, zero past D: A needs one row stride, the keys are
// scattered), then per head-dim step of 32, A = those rows, B = the row's
// transposed query pair words as they are (qt: (amx_headdim / 2, S) words,
// zero past D / 2), up to four C tiles of 16 query lanes; C goes to cbuf
// and each key's lanes fold into its block's max as on the vector path
// (causal lanes dropped, NaN passed over). TDPBF16PS sums each pair's two
// bf16 products (exact in fp32) in fp32, as vdpbf16ps does, in its own
// order. The lines `ahead` are prefetched one per line copied.
void amx_batch_scores(const ScoreProblem& p, const RowContext& row, const void* const* kp, const int64_t* kpos,
                      const int* owner, int nk, int n, float* score, uint16_t* kbuf, float* cbuf, Spread ahead) {
  const int dp = amx_headdim(p.D), groups = p.S / 16, row_bytes = p.D * 2;
  const int line_steps = (row_bytes + 63) / 64;
  const uint32_t* qt = static_cast<const uint32_t*>(row.qt);
  const int64_t pair_stride = int64_t{p.S} * 4, key_stride = int64_t{dp} * 2;
  __m512 best[kAmxKeys];
  for (int i = 0; i < n; ++i) best[i] = _mm512_set1_ps(kNegInf);
  const char* const* touch = ahead.plan(nk * line_steps);
  for (int k0 = 0; k0 < nk; k0 += kAmxKeys) {
    const int m = std::min(kAmxKeys, nk - k0);
    for (int u = 0; u < m; ++u, touch += line_steps) {
      const char* src = static_cast<const char*>(kp[k0 + u]);
      char* dst = reinterpret_cast<char*>(kbuf + static_cast<size_t>(u) * dp);
      for (int l = 0; l < line_steps; ++l) {
        const int bytes = std::min(64, row_bytes - 64 * l);
        const __mmask64 mask = bytes == 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
        _mm512_mask_storeu_epi8(dst + 64 * l, mask, _mm512_maskz_loadu_epi8(mask, src + 64 * l));
        prefetch_l2(touch[l]);
      }
    }
    for (int g0 = 0; g0 < groups; g0 += 4) {
      const int ng = std::min(4, groups - g0);
      amx::zero<0>();
      if (ng > 1) amx::zero<1>();
      if (ng > 2) amx::zero<2>();
      if (ng > 3) amx::zero<3>();
      for (int s = 0; s < dp / 32; ++s) {
        amx::load<4>(kbuf + s * 32, key_stride);
        const uint32_t* qs = qt + static_cast<size_t>(s) * 16 * p.S + g0 * 16;
        amx_group<0>(qs, pair_stride);
        if (ng > 1) amx_group<1>(qs, pair_stride);
        if (ng > 2) amx_group<2>(qs, pair_stride);
        if (ng > 3) amx_group<3>(qs, pair_stride);
      }
      amx::store<0>(cbuf, 64);
      if (ng > 1) amx::store<1>(cbuf + 256, 64);
      if (ng > 2) amx::store<2>(cbuf + 512, 64);
      if (ng > 3) amx::store<3>(cbuf + 768, 64);
      for (int u = 0; u < m; ++u)
        for (int g = 0; g < ng; ++g) {
          __m512 sum = _mm512_loadu_ps(cbuf + g * 256 + u * 16);
          if (p.causal) sum = Isa::drop_after(sum, row.qpos + (g0 + g) * 16, static_cast<int32_t>(kpos[k0 + u]));
          best[owner[k0 + u]] = Isa::max(sum, best[owner[k0 + u]]);  // sum first: NaN passed over
        }
    }
  }
  for (int i = 0; i < n; ++i) score[i] = std::max(score[i], Isa::hmax(best[i]));
}
#endif

// score[i] = the row's score of blocks[i] for i < n <= kBlocksPerBatch (blocks[i] <
// 0: an empty candidate, -inf) on the vector paths (p.S % Isa::W == 0;
// bf16 keys with AVX512-BF16). kp, kpos and owner hold n * bk entries; the
// lines `ahead` are prefetched meanwhile.
void batch_scores(const ScoreProblem& p, const RowContext& row, const int64_t* blocks, int n, float* score,
                  const void** kp, int64_t* kpos, int* owner, uint16_t* kbuf, float* cbuf, Spread ahead) {
  int nk = 0;
  for (int i = 0; i < n; ++i) {
    score[i] = kNegInf;
    if (blocks[i] < 0) continue;
    for (int t = 0; t < p.bk; ++t) {
      const int64_t pos = blocks[i] * p.bk + t;
      if (pos < p.sink || pos > row.end) continue;
      kp[nk] = p.bf16 ? static_cast<const void*>(key_at<uint16_t>(p, row.b, row.hk, pos))
                      : static_cast<const void*>(key_at(p, row.b, row.hk, pos));
      kpos[nk] = pos;
      owner[nk++] = i;
    }
  }
  if (nk == 0) {
    for (int i = 0; i < ahead.count; ++i) prefetch_l2(ahead.touch[i]);
    return;
  }
#ifdef LONGATTN_AMX_SEARCH
  if (p.amx) return amx_batch_scores(p, row, kp, kpos, owner, nk, n, score, kbuf, cbuf, ahead);
#endif
  (void)kbuf; (void)cbuf;
#ifdef LONGATTN_AVX512BF16
  if (p.bf16) return batch_tiles<uint16_t>(p, row, kp, kpos, owner, nk, n, score, ahead);
#endif
  batch_tiles<float>(p, row, kp, kpos, owner, nk, n, score, ahead);
}
#endif

// Blocks scored before a prefetched one is needed (into L2). The search's
// blocks are scattered over the whole context: no hardware prefetcher follows
// them. At 64k, float32, the search ran 1.1-1.3x faster with the prefetch
// (all of a block's lines at once) than without, and 1.1x faster again with
// the lines spread over the batch's steps (Spread); 4, 12 or 16 blocks ahead
// measured the same as 8. With every key read from L1 instead (a test build
// scoring the same 8 keys throughout) it ran only 3-9% faster (Intel Xeon,
// A/B in one process).
constexpr int kPrefetchAhead = 8;

// Writes the 64-byte lines of block's searchable key rows from lines[0];
// returns how many (at most bk * line_count(p)).
int line_count(const ScoreProblem& p) { return (p.D * (p.bf16 ? 2 : 4) + 63) / 64; }
int block_lines(const ScoreProblem& p, const RowContext& row, int64_t block, const char** lines) {
  const int bytes = p.D * (p.bf16 ? 2 : 4);
  int n = 0;
  for (int t = 0; t < p.bk; ++t) {
    const int64_t pos = block * p.bk + t;
    if (pos < p.sink || pos > row.end) continue;
    const char* k = p.bf16 ? reinterpret_cast<const char*>(key_at<uint16_t>(p, row.b, row.hk, pos))
                           : reinterpret_cast<const char*>(key_at(p, row.b, row.hk, pos));
    for (int off = 0; off < bytes; off += 64) lines[n++] = k + off;
  }
  return n;
}

// The k-th largest (1-based, 1 <= k <= n) of x[0..n), NaN-free; x and the
// scratch gt, lt (n floats each) are overwritten. A quickselect whose
// three-way partition writes every value to both sides and advances each
// side's end by a comparison, without a branch: std::nth_element's
// mispredicted branches made it 2.6x slower on HiP's 512 scores a round
// (~7% of the search).
float kth_largest(float* x, int n, int k, float* gt, float* lt) {
  while (n > 16) {
    const float a = x[0], b = x[n / 2], c = x[n - 1];
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    int g = 0, l = 0;
    for (int i = 0; i < n; ++i) {
      const float v = x[i];
      gt[g] = v;
      g += v > pivot;
      lt[l] = v;
      l += v < pivot;
    }
    if (k <= g) {
      std::swap(x, gt);
      n = g;
    } else if (k <= n - l) {
      return pivot;  // among the values equal to the pivot
    } else {
      k -= n - l;
      std::swap(x, lt);
      n = l;
    }
  }
  std::sort(x, x + n, std::greater<float>());
  return x[k - 1];
}

// The tree search of one row (see longattn/sparse/hip_mask.py), a round at a
// time: `rounds` times, halve each of the nb groups [starts, ends), score
// each half by its centre block (empty halves -inf; a half whose centre is
// its group's keeps the group's score, known_score) and keep the nb best,
// ties to the earlier half (so the result does not depend on the sort).
// Groups stay in branch order.
class RowSearch {
 public:
  RowSearch(const ScoreProblem& p, int64_t r, int64_t* starts, int64_t* ends, int nb, int rounds)
      : p_(p), qt_(transposed_words(p)), row_(row_context(p, r, qt_.data())), s_(starts + r * nb), e_(ends + r * nb),
        nb_(nb),
        cs_(2 * nb), ce_(2 * nb), score_(2 * nb), ranked_(6 * nb), kept_(nb), todo_(2 * nb),
        kp_(static_cast<size_t>(kBatchKeys) * p.bk), kpos_(kp_.size()), owner_(kp_.size()),
        batch_blocks_(batch_blocks(p)), kbuf_(p.amx ? static_cast<size_t>(16) * amx_headdim(p.D) : 0),
        cbuf_(p.amx ? 1024 : 0),
        // a batch's steps (passes <= keys, steps <= D) or its blocks' lines, whichever is more
        // (sized by this path's batch: filled once per row, it is written in full)
        touch_(static_cast<size_t>(std::max(batch_blocks_, 1)) * p.bk * std::max(p.D, line_count(p)), idle_line()) {
    // A row whose groups are already single blocks is done: rows with short
    // ranges (early query blocks, when causal) need fewer rounds than the longest.
    int64_t largest = 0;
    for (int g = 0; g < nb; ++g) largest = std::max(largest, e_[g] - s_[g]);
    int needed = 0;
    while ((int64_t{1} << needed) < largest) ++needed;
    rounds_ = std::min(rounds, needed);
    if (rounds_ > 0) transpose_queries(p, row_, qt_.data());
  }
  int rounds() const { return rounds_; }

  // The groups ordered by start, empty ones last (the order callers list key blocks in).
  void order_groups() {
    const int nb = nb_;
    std::vector<int> order(nb);
    for (int g = 0; g < nb; ++g) order[g] = g;
    std::sort(order.begin(), order.end(), [this](int a, int b) {
      const bool empty_a = e_[a] <= s_[a], empty_b = e_[b] <= s_[b];
      if (empty_a != empty_b) return empty_b;
      return s_[a] != s_[b] ? s_[a] < s_[b] : a < b;
    });
    for (int g = 0; g < nb; ++g) { cs_[g] = s_[order[g]]; ce_[g] = e_[order[g]]; }
    std::copy(cs_.begin(), cs_.begin() + nb, s_);
    std::copy(ce_.begin(), ce_.begin() + nb, e_);
  }

  void round() {
    const int nb = nb_;
    for (int g = 0; g < nb; ++g) {
      const int64_t mid = (s_[g] + e_[g]) / 2;
      cs_[g] = s_[g]; ce_[g] = mid;
      cs_[nb + g] = mid; ce_[nb + g] = e_[g];
    }
    score_halves();
    keep_best();
    kept_scored_ = true;
  }

 private:
  // The block a group [s, e) is scored by.
  static int64_t centre_of(int64_t s, int64_t e) { return (s + e - 1) / 2; }
  int64_t centre(int i) const { return centre_of(cs_[i], ce_[i]); }

#ifdef LONGATTN_AVX2
  static constexpr int kBatchKeys = 16;  // most blocks per batch_scores call (times bk keys): see batch_blocks
#else
  static constexpr int kBatchKeys = 0;  // no batched path: the batch lists stay empty
#endif
  // Blocks per batch_scores call: kBlocksPerBatch on the vector paths, as
  // many as fill a tile's 16 key rows on AMX.
  static int batch_blocks(const ScoreProblem& p) {
#ifdef LONGATTN_AMX_SEARCH
    if (p.amx) return amx_blocks_per_batch(p.bk);
#endif
    (void)p;
#ifdef LONGATTN_AVX2
    return kBlocksPerBatch;
#else
    return 0;
#endif
  }

  // The score of candidate i when it is already known: a half whose centre
  // is its group's centre (a group of 1, 2 or 3 blocks: the last round of a
  // full-length row, and every round after a short group reached one block)
  // was scored, as that group, in the previous round. The same block, row
  // and arithmetic: the same score, without reading its keys again.
  bool known_score(int i, float* score) const {
    if (!kept_scored_) return false;
    const int g = i < nb_ ? i : i - nb_;
    if (centre(i) != centre_of(s_[g], e_[g])) return false;
    *score = kept_[g];
    return true;
  }

  void score_halves() {
    const int n2 = 2 * nb_;
    // The candidates to score: nonempty halves whose score is not known.
    int todo = 0;
    for (int i = 0; i < n2; ++i) {
      score_[i] = kNegInf;
      if (ce_[i] > cs_[i] && !known_score(i, &score_[i])) todo_[todo++] = i;
    }
#ifdef LONGATTN_AVX2
    // The vector paths: candidate blocks scored a batch at a time
    // (bf16 only reaches here with AVX512-BF16, W = 16; the entry checked S % 16).
    if (p_.S % Isa::W == 0) {
      for (int t0 = 0; t0 < todo; t0 += batch_blocks_) {
        const int n = std::min(batch_blocks_, todo - t0);
        int64_t blocks[kBatchKeys];
        float scores[kBatchKeys];
        int lines = 0;
        for (int t = t0; t < t0 + n; ++t) {
          // Blocks are scattered over the sequence: fetch later ones while these compute.
          if (t + kPrefetchAhead < todo)
            lines += block_lines(p_, row_, centre(todo_[t + kPrefetchAhead]), touch_.data() + lines);
          blocks[t - t0] = centre(todo_[t]);
        }
        // The previous batch's lines past this one's: back to a line in L1.
        std::fill(touch_.begin() + lines, touch_.begin() + std::max(lines, touched_), idle_line());
        touched_ = lines;
        batch_scores(p_, row_, blocks, n, scores, kp_.data(), kpos_.data(), owner_.data(), kbuf_.data(), cbuf_.data(),
                     Spread{touch_.data(), lines});
        for (int t = t0; t < t0 + n; ++t) score_[todo_[t]] = scores[t - t0];
      }
      return;
    }
#endif
    for (int t = 0; t < todo; ++t) {
      // Blocks are scattered over the sequence: fetch a later one while this one computes.
      if (t + kPrefetchAhead < todo) {
        const int lines = block_lines(p_, row_, centre(todo_[t + kPrefetchAhead]), touch_.data());
        for (int i = 0; i < lines; ++i) prefetch_l2(touch_[i]);
      }
      score_[todo_[t]] = score_block_scalar(p_, static_cast<const float*>(row_.qt), row_.qpos, row_.end, row_.b,
                                            row_.hk, centre(todo_[t]) * p_.bk);
    }
  }

  // Keep the nb best in branch order, ties to the earlier half: the nb-th
  // largest score is the threshold; every half above it is kept, and of
  // those equal to it the earliest ones, as many as are left (no sort of
  // indices). Scores are never NaN (NaN dot products are passed over; a
  // block with no other scores -inf); the check keeps the order total anyway.
  void keep_best() {
    const int nb = nb_, n2 = 2 * nb;
    for (int i = 0; i < n2; ++i)
      if (std::isnan(score_[i])) score_[i] = kNegInf;
    std::copy(score_.begin(), score_.end(), ranked_.begin());
    const float threshold = kth_largest(ranked_.data(), n2, nb, ranked_.data() + n2, ranked_.data() + 2 * n2);
    int equal_left = nb;
    for (int i = 0; i < n2; ++i) equal_left -= score_[i] > threshold;
    int g = 0;
    for (int i = 0; i < n2 && g < nb; ++i)
      if (score_[i] > threshold || (score_[i] == threshold && equal_left-- > 0)) {
        s_[g] = cs_[i]; e_[g] = ce_[i]; kept_[g] = score_[i]; ++g;
      }
  }

  const ScoreProblem& p_;
  std::vector<uint32_t> qt_;  // the row's strided queries, transposed (transpose_queries)
  const RowContext row_;
  int64_t* const s_;
  int64_t* const e_;
  const int nb_;
  int rounds_;
  std::vector<int64_t> cs_, ce_;
  std::vector<float> score_, ranked_;  // ranked_: the scores and kth_largest's scratch (3 x 2 nb)
  std::vector<float> kept_;            // the kept groups' scores (as their centre block), once kept_scored_
  bool kept_scored_ = false;
  std::vector<int> todo_;              // the candidates score_halves computes
  std::vector<const void*> kp_;        // one batch's key rows, positions and blocks (batch_scores), sized once
  std::vector<int64_t> kpos_;
  std::vector<int> owner_;
  const int batch_blocks_;
  std::vector<uint16_t> kbuf_;  // AMX: a batch's key rows, 16 x amx_headdim(D) bf16 (zero past D)
  std::vector<float> cbuf_;     // AMX: the C tiles' scores, 4 x 16 keys x 16 lanes
  // The lines of the blocks kPrefetchAhead later, prefetched while a batch
  // is scored (Spread), then idle_line() for its remaining steps.
  std::vector<const char*> touch_;
  int touched_ = 0;  // the lines the last batch put in touch_ (the rest is idle_line())
  const char* idle_line() const { return static_cast<const char*>(row_.qt); }  // the row's queries: in L1
};

// Rows searched together, round by round: neighbouring query blocks of a
// head score mostly the same key blocks in the same round (their ranges
// nearly agree, and so do their trees early on), so a group's later rows
// find keys its first row fetched still in cache. At 64k (Zen 4, 2 threads,
// A/B in one process on a noisy VM) 1-6% faster than row by row; 16 or 32
// rows per group were no better. Groups go to the threads in turn, so both
// work on neighbouring rows and share the L3.
constexpr int kRowsPerGroup = 8;

void search_rows(const ScoreProblem& p, int64_t r0, int64_t r1, int64_t* starts, int64_t* ends, int nb, int rounds) {
#ifdef LONGATTN_AMX_SEARCH
  const AmxTiles tiles(p.amx);  // this thread's tile configuration, released at the end
#endif
  std::vector<RowSearch> group;
  group.reserve(static_cast<size_t>(r1 - r0));
  int most = 0;
  for (int64_t r = r0; r < r1; ++r) {
    group.emplace_back(p, r, starts, ends, nb, rounds);
    most = std::max(most, group.back().rounds());
  }
  for (int round = 0; round < most; ++round)
    for (RowSearch& row : group)
      if (round < row.rounds()) row.round();
  for (RowSearch& row : group) row.order_groups();
}

// Whether this build scores bf16 on AMX tiles and the OS lets this process use them.
bool amx_search() {
#ifdef LONGATTN_AMX_SEARCH
  return amx_ready();
#else
  return false;
#endif
}

int run_search(const void* q, int64_t q_sb, int64_t q_ss, int64_t q_sh, int64_t q_offset, int q_dim,
               const int32_t* query_pos, const int64_t* range_end, const void* keys,
               int64_t batch_stride, int64_t head_stride, int64_t pos_stride, const int64_t* block_table,
               int64_t bt_stride, int page_size, int64_t* starts, int64_t* ends, int64_t rows, int S, int D, int bk,
               int nb, int rounds, int sink, int causal, int nheads, int nheads_k, int nqb, int num_threads,
               bool bf16) {
  if (S < 1 || D < 1 || bk < 1 || nb < 1 || rounds < 0 || nheads_k < 1 || nheads % nheads_k || nqb < 1) return 1;
  if (block_table != nullptr && page_size < 1) return 1;
  if (num_threads < 1) return 1;  // num_threads(n) must be positive (OpenMP leaves n < 1 undefined)
  if (bf16 && (D % 2 || S % 16)) return 1;
  if (q_dim < 1 || q_dim > D) return 1;
  const ScoreProblem p{q, q_sb, q_ss, q_sh, q_offset, q_dim, query_pos, range_end, keys, batch_stride, head_stride,
                       pos_stride, block_table, bt_stride, page_size, rows, S, D, bk, sink, causal, nheads, nheads_k,
                       nqb, bf16, bf16 && amx_search()};
  // A row's state is 60 * nb bytes (its 2 nb halves' bounds, scores and
  // indices, its nb kept scores) and its transposed queries: groups stay
  // within ~1 MiB, so a huge nb searches row by row.
  const int64_t row_bytes = 60 * int64_t{nb} + 4 * static_cast<int64_t>(transposed_words(p));
  const int64_t per_group = std::max<int64_t>(1, std::min<int64_t>(kRowsPerGroup, (int64_t{1} << 20) / row_bytes));
  const int64_t groups = (rows + per_group - 1) / per_group;
#pragma omp parallel for num_threads(num_threads) schedule(static, 1)
  for (int64_t g = 0; g < groups; ++g)
    search_rows(p, g * per_group, std::min(rows, (g + 1) * per_group), starts, ends, nb, rounds);
  return 0;
}
}  // namespace

// The full search for every row: starts/ends (rows, nb) hold the initial
// groups on entry and the selected single blocks (or empty groups) on return.
extern "C" int longattn_hip_search(
    const float* q, int64_t q_sb, int64_t q_ss, int64_t q_sh, int64_t q_offset, int q_dim,
    const int32_t* query_pos, const int64_t* range_end,
    const float* keys, int64_t batch_stride, int64_t head_stride, int64_t pos_stride,
    const int64_t* block_table, int64_t bt_stride, int page_size,
    int64_t* starts, int64_t* ends, int64_t rows, int S, int D, int bk, int nb, int rounds, int sink, int causal,
    int nheads, int nheads_k, int nqb, int num_threads) {
  return run_search(q, q_sb, q_ss, q_sh, q_offset, q_dim, query_pos, range_end, keys, batch_stride, head_stride,
                    pos_stride, block_table, bt_stride, page_size, starts, ends, rows, S, D, bk, nb, rounds, sink,
                    causal, nheads, nheads_k, nqb, num_threads, false);
}

// 1 when this build has the bfloat16 search (AVX512-BF16), else 0.
extern "C" int longattn_hip_search_has_bf16() {
#ifdef LONGATTN_AVX512BF16
  return 1;
#else
  return 0;
#endif
}

// 1 when the bfloat16 search scores on AMX tiles here (this build targets
// them, or emulates them, and the OS granted this process AMX state), else 0.
extern "C" int longattn_hip_search_uses_amx() { return amx_search() ? 1 : 0; }

// The same search on bfloat16: q bf16 bits, keys bf16 rows; D even, S a
// multiple of 16. Returns 2 when built without AVX512-BF16.
extern "C" int longattn_hip_search_bf16(
    const uint16_t* q, int64_t q_sb, int64_t q_ss, int64_t q_sh, int64_t q_offset, int q_dim,
    const int32_t* query_pos, const int64_t* range_end,
    const uint16_t* keys, int64_t batch_stride, int64_t head_stride, int64_t pos_stride,
    const int64_t* block_table, int64_t bt_stride, int page_size,
    int64_t* starts, int64_t* ends, int64_t rows, int S, int D, int bk, int nb, int rounds, int sink, int causal,
    int nheads, int nheads_k, int nqb, int num_threads) {
#ifdef LONGATTN_AVX512BF16
  return run_search(q, q_sb, q_ss, q_sh, q_offset, q_dim, query_pos, range_end, keys, batch_stride, head_stride,
                    pos_stride, block_table, bt_stride, page_size, starts, ends, rows, S, D, bk, nb, rounds, sink,
                    causal, nheads, nheads_k, nqb, num_threads, true);
#else
  (void)q; (void)q_sb; (void)q_ss; (void)q_sh; (void)q_offset; (void)q_dim; (void)query_pos; (void)range_end; (void)keys; (void)batch_stride; (void)head_stride;
  (void)pos_stride; (void)block_table; (void)bt_stride; (void)page_size; (void)starts; (void)ends; (void)rows;
  (void)S; (void)D; (void)bk; (void)nb; (void)rounds; (void)sink; (void)causal; (void)nheads; (void)nheads_k;
  (void)nqb; (void)num_threads;
  return 2;
#endif
}
