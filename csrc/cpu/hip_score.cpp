// HiP's branch scoring on the CPU: for every (batch, head, query block) row
// and each of its candidate key blocks, the max of q . k over the row's
// strided queries and the block's searchable keys.
//
// The tree search (longattn/sparse/hip_mask.py) calls this once per round;
// it is the hot loop of HiP's mask estimation. Keys are read in place (no
// gather), queries are held transposed, (headdim, S), so one key row updates
// S query lanes with broadcast FMAs and no horizontal sums; the max over the
// lanes is taken once per block.
//
// Layouts (contiguous):
//   queries_t   (rows, D, S) float32: row r's strided queries, transposed;
//               S a multiple of the vector width (callers pad by repeating a query)
//   query_pos   (nqb, S) int32: key position of each strided query of query block qb
//   range_end   (nqb,)  int64: last searchable key of query block qb
//   key_blocks  (batch * nheads_k * nkb, bk * D) float32: keys by block, zero-padded
//   blocks      (rows, c) int64: block indices to score, each in [0, nkb)
//   out         (rows, c) float32
// Row r is (b, h, qb) = (r / (nheads * nqb), (r / nqb) % nheads, r % nqb);
// head h reads kv head h / (nheads / nheads_k).
// A key at position p counts iff sink <= p <= range_end[qb]; with causal, for
// query lane s only if p <= query_pos[qb][s]. No key counted: -inf.

#include <algorithm>
#include <cstdint>
#include <limits>

#include "simd.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct ScoreProblem {
  const float* queries_t; const int32_t* query_pos; const int64_t* range_end;
  const float* key_blocks; const int64_t* blocks;
  int64_t rows; int S, D, bk, c, sink, causal, nheads, nheads_k, nqb, nkb;
  float* out;
};

float score_block_scalar(const ScoreProblem& p, const float* qt, const int32_t* qpos, int64_t end,
                         const float* kb, int64_t first_pos) {
  float best = kNegInf;
  for (int t = 0; t < p.bk; ++t) {
    const int64_t pos = first_pos + t;
    if (pos < p.sink || pos > end) continue;
    const float* k = kb + static_cast<int64_t>(t) * p.D;
    for (int s = 0; s < p.S; ++s) {
      if (p.causal && pos > qpos[s]) continue;
      float dot = 0.0f;
      for (int d = 0; d < p.D; ++d) dot += qt[static_cast<int64_t>(d) * p.S + s] * k[d];
      best = std::max(best, dot);
    }
  }
  return best;
}

#ifdef LONGATTN_AVX2
// NV vectors of query lanes (NV * W queries) starting at lane s0; two keys at
// a time, each split into even and odd d: 4 * NV independent FMA chains.
template <int NV>
void max_over_tile(const ScoreProblem& p, const float* qt, const int32_t* qpos, int s0, const float* kb,
                   int64_t first_pos, int64_t end, typename Isa::vec best[NV]) {
  using V = Isa;
  const int D = p.D, S = p.S;
  int t = 0;
  auto valid = [&](int tt) { const int64_t pos = first_pos + tt; return pos >= p.sink && pos <= end; };
  auto finish = [&](typename V::vec sum, int v, int64_t pos) {
    if (p.causal) sum = V::drop_after(sum, qpos + s0 + v * V::W, static_cast<int32_t>(pos));
    best[v] = V::max(best[v], sum);
  };
  while (t < p.bk) {
    if (!valid(t)) { ++t; continue; }
    const bool pair = t + 1 < p.bk && valid(t + 1);
    const float* k0 = kb + static_cast<int64_t>(t) * D;
    const float* k1 = pair ? k0 + D : k0;
    typename V::vec a[NV][4];
    for (int v = 0; v < NV; ++v) for (int i = 0; i < 4; ++i) a[v][i] = V::zero();
    int d = 0;
    for (; d + 1 < D; d += 2) {
      const float* q0 = qt + static_cast<int64_t>(d) * S + s0;
      const float* q1 = q0 + S;
      const typename V::vec k0a = V::set1(k0[d]), k0b = V::set1(k0[d + 1]);
      const typename V::vec k1a = V::set1(k1[d]), k1b = V::set1(k1[d + 1]);
      for (int v = 0; v < NV; ++v) {
        const typename V::vec x0 = V::load(q0 + v * V::W), x1 = V::load(q1 + v * V::W);
        a[v][0] = V::fma(x0, k0a, a[v][0]);
        a[v][1] = V::fma(x1, k0b, a[v][1]);
        a[v][2] = V::fma(x0, k1a, a[v][2]);
        a[v][3] = V::fma(x1, k1b, a[v][3]);
      }
    }
    if (d < D) {  // odd headdim
      const float* q0 = qt + static_cast<int64_t>(d) * S + s0;
      for (int v = 0; v < NV; ++v) {
        const typename V::vec x0 = V::load(q0 + v * V::W);
        a[v][0] = V::fma(x0, V::set1(k0[d]), a[v][0]);
        a[v][2] = V::fma(x0, V::set1(k1[d]), a[v][2]);
      }
    }
    for (int v = 0; v < NV; ++v) {
      finish(V::add(a[v][0], a[v][1]), v, first_pos + t);
      if (pair) finish(V::add(a[v][2], a[v][3]), v, first_pos + t + 1);
    }
    t += pair ? 2 : 1;
  }
}

template <int NV>
void score_row_tiles(const ScoreProblem& p, const float* qt, const int32_t* qpos, int s0, const int64_t* blocks,
                     const float* kv_blocks, int64_t end, float* out) {
  using V = Isa;
  for (int j = 0; j < p.c; ++j) {
    typename V::vec best[NV];
    for (int v = 0; v < NV; ++v) best[v] = V::set1(kNegInf);
    const float* kb = kv_blocks + blocks[j] * static_cast<int64_t>(p.bk) * p.D;
    max_over_tile<NV>(p, qt, qpos, s0, kb, blocks[j] * p.bk, end, best);
    typename V::vec m = best[0];
    for (int v = 1; v < NV; ++v) m = V::max(m, best[v]);
    out[j] = std::max(out[j], V::hmax(m));
  }
}
#endif

void score_row(const ScoreProblem& p, int64_t r) {
  const int64_t b = r / (static_cast<int64_t>(p.nheads) * p.nqb);
  const int h = static_cast<int>((r / p.nqb) % p.nheads), qb = static_cast<int>(r % p.nqb);
  const int hk = h / (p.nheads / p.nheads_k);
  const float* qt = p.queries_t + r * static_cast<int64_t>(p.D) * p.S;
  const int32_t* qpos = p.query_pos + static_cast<int64_t>(qb) * p.S;
  const int64_t end = p.range_end[qb];
  const float* kv_blocks = p.key_blocks + (b * p.nheads_k + hk) * static_cast<int64_t>(p.nkb) * p.bk * p.D;
  const int64_t* blocks = p.blocks + r * p.c;
  float* out = p.out + r * p.c;
  std::fill(out, out + p.c, kNegInf);
#ifdef LONGATTN_AVX2
  if (p.S % Isa::W == 0) {
    int s0 = 0;
    for (; s0 + 4 * Isa::W <= p.S; s0 += 4 * Isa::W) score_row_tiles<4>(p, qt, qpos, s0, blocks, kv_blocks, end, out);
    switch ((p.S - s0) / Isa::W) {
      case 3: score_row_tiles<3>(p, qt, qpos, s0, blocks, kv_blocks, end, out); break;
      case 2: score_row_tiles<2>(p, qt, qpos, s0, blocks, kv_blocks, end, out); break;
      case 1: score_row_tiles<1>(p, qt, qpos, s0, blocks, kv_blocks, end, out); break;
      default: break;
    }
    return;
  }
#endif
  for (int j = 0; j < p.c; ++j)
    out[j] = score_block_scalar(p, qt, qpos, end, kv_blocks + blocks[j] * static_cast<int64_t>(p.bk) * p.D,
                                blocks[j] * p.bk);
}

}  // namespace

extern "C" int longattn_hip_score_blocks(
    const float* queries_t, const int32_t* query_pos, const int64_t* range_end, const float* key_blocks,
    const int64_t* blocks, int64_t rows, int S, int D, int bk, int c, int sink, int causal, int nheads,
    int nheads_k, int nqb, int nkb, float* out, int num_threads) {
  if (S < 1 || D < 1 || bk < 1 || c < 0 || nheads_k < 1 || nheads % nheads_k || nqb < 1) return 1;
  const ScoreProblem p{queries_t, query_pos, range_end, key_blocks, blocks, rows, S, D, bk, c, sink, causal,
                       nheads, nheads_k, nqb, nkb, out};
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) score_row(p, r);
  return 0;
}
