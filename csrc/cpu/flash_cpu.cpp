// Flash-attention forward on the CPU: float32, windows, attention sinks, softcap, GQA.
//
// Why our own: PyTorch's fused CPU kernel runs its block products through a
// BLAS that reaches ~186 GFLOP/s on this AMD machine's two cores (a large
// torch.mm; about the 256-bit FMA rate) against a 455 GFLOP/s AVX-512 FMA
// peak (a register-only loop); these AVX-512 micro-kernels reach ~260-330. And it visits only the key tiles a query block can see, so
// a sliding window (StreamingLLM's sinks + window) costs ~seqlen * (sink +
// window), never a dense pass.
//
// Work item: (batch entry or packed sequence, head, block of BM query rows; with listed keys, pieces
// of at most BM rows of one listing block of block_q). Its queries, pre-scaled,
// are stored transposed (Qt[d][row]) once, so that
//   * scores of a tile of keys come out key-major, St[key][row] += K[key][d] *
//     Qt[d][row]: each K element is broadcast straight from its row in memory
//     (no packing of K), each Qt vector serves KR keys;
//   * the online softmax is vectorised over rows (max, exp, sum per key row);
//   * P V accumulates O[row][d] from V rows read in place, R rows x NV vectors.
// Key tiles cover the window span of the block's rows, the sinks outside it,
// and listed keys outside both (gathered through row pointers, no copies);
// only tiles some row sees partially are masked element by element.
//
// Visibility: query row i sits at key position p = i + seqlen_k - seqlen_q
// and sees key j iff (not causal or j <= p) and
//   * j is in the window: (left < 0 or j >= p - left) and (right < 0 or j <= p + right)
//     (flash-attn's convention; dense attention passes causal folded into right = 0), or
//   * j < sink (a sink), or
//   * j is listed for the row's query block (block-sparse attention: the
//     caller passes, per (batch, head, block of block_q rows), key positions
//     or -1).
// Rows that see nothing get out = 0, lse = -inf. lse is natural-log. Each
// work item is computed by one thread in a fixed order: results do not
// depend on the thread count or schedule.
//
// Layouts (element strides, headdim innermost and contiguous):
//   q, out (batch, seqlen_q, nheads, headdim); k, v (batch, seqlen_k, nheads_k, headdim)
//   lse (batch, nheads, seqlen_q) contiguous.
// Varlen entry (longattn_flash_cpu_varlen, packed sequences as flash-attn's
// varlen functions): q, out (total_q, nheads, headdim); k, v (total_k, nheads_k,
// headdim); lse (nheads, total_q); each sequence is aligned on its own.
// headdim must be a multiple of the vector width (the caller pads).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd.h"

#ifdef LONGATTN_AVX2
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int W = Isa::W;
constexpr int NQ = 3;        // query vectors per work item
constexpr int BM = NQ * W;   // query rows per work item: 48 with AVX-512, 24 with AVX2
constexpr int KR = 8;        // keys per score micro-step (KR x NQ accumulators)
constexpr int BN = 64;       // keys per tile (a multiple of KR)
constexpr int R = 6;         // rows per P V micro-step (R x NV accumulators)
constexpr int NV = 4;        // headdim vectors per P V micro-step

// cap * tanh(x / cap), with tanh(y) = 1 - 2 / (exp(2y) + 1) (saturates to +-1, no overflow).
inline Isa::vec softcap_vec(Isa::vec x, float cap) {
  const Isa::vec e = Isa::exp(Isa::mul(x, Isa::set1(2.0f / cap)));
  const Isa::vec t = Isa::sub(Isa::set1(1.0f), Isa::div(Isa::set1(2.0f), Isa::add(e, Isa::set1(1.0f))));
  return Isa::mul(t, Isa::set1(cap));
}

// What every work item shares: row and head strides (element strides, 64-bit:
// rows of a packed tensor pass 2**31 elements), shape and mask options.
struct Problem {
  int64_t q_ss, q_sh, k_ss, k_sh, v_ss, v_sh, o_ss, o_sh;
  int nheads, nheads_k, headdim, left, right, sink;
  bool causal;
  float scale, softcap;
  int listed_per_block, block_q;
};

// One sequence: a batch entry of the dense layout, or one packed sequence of
// the varlen layout. Pointers are at its row 0 (head 0); strides are the Problem's.
struct Seq {
  const float *q, *k, *v;
  float* out;
  float* lse;      // lse of (head 0, row 0)
  int64_t lse_sh;  // lse head stride
  const int32_t* listed;  // (nheads, query blocks, listed_per_block) key positions, -1 = none; or null
  int seqlen_q, seqlen_k;
};

struct Scratch {  // one per thread
  std::vector<float> qt, st, o, m, l, alpha;
  std::vector<uint8_t> in_list;  // listed flags over the window span
  std::vector<int64_t> keys, extra;  // a tile's key positions; listed keys outside the span
  explicit Scratch(int headdim)
      : qt(static_cast<size_t>(headdim) * BM), st(BN * BM), o(static_cast<size_t>(BM) * headdim), m(BM), l(BM),
        alpha(BM), keys(BN) {}
};

// St[j][0..BM) = sum_d K[j][d] Qt[d][0..BM) for KR keys.
inline void score_keys(const float* qt, int headdim, const float* const* krow, float* st) {
  Isa::vec acc[KR][NQ];
  for (int j = 0; j < KR; ++j)
    for (int c = 0; c < NQ; ++c) acc[j][c] = Isa::zero();
  for (int d = 0; d < headdim; ++d) {
    Isa::vec qv[NQ];
    for (int c = 0; c < NQ; ++c) qv[c] = Isa::load(qt + d * BM + c * W);
    for (int j = 0; j < KR; ++j) {
      const Isa::vec kv = Isa::set1(krow[j][d]);
      for (int c = 0; c < NQ; ++c) acc[j][c] = Isa::fma(kv, qv[c], acc[j][c]);
    }
  }
  for (int j = 0; j < KR; ++j)
    for (int c = 0; c < NQ; ++c) Isa::store(st + j * BM + c * W, acc[j][c]);
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

inline bool visible(const Problem& pb, int64_t j, int64_t p, bool listed) {
  if (pb.causal && j > p) return false;
  const bool in_window = (pb.left < 0 || j >= p - pb.left) && (pb.right < 0 || j <= p + pb.right);
  return in_window || j < pb.sink || listed;
}

// One tile of n <= BN keys at positions keys[0..n), for rows at positions
// p0 .. p0 + BM - 1; listed[j] (or null: none) marks listed keys.
void key_tile(const Problem& pb, Scratch& s, int rows_padded, const float* k_base, const float* v_base,
              const int64_t* keys, const uint8_t* listed, int n, int64_t p0, bool needs_mask) {
  const int headdim = pb.headdim;
  const float* krow[BN];
  const float* vrow[BN];
  for (int j = 0; j < BN; ++j) {  // keys past n repeat the last one (masked out below)
    const int64_t pos = keys[std::min(j, n - 1)];
    krow[j] = k_base + pos * pb.k_ss;
    vrow[j] = v_base + pos * pb.v_ss;
  }
  const int n_scored = (n + KR - 1) / KR * KR;
  float* st = s.st.data();
  for (int j = 0; j < n_scored; j += KR) score_keys(s.qt.data(), headdim, krow + j, st + j * BM);
  if (pb.softcap > 0)
    for (int j = 0; j < n_scored; ++j)
      for (int c = 0; c < NQ; ++c)
        Isa::store(st + j * BM + c * W, softcap_vec(Isa::load(st + j * BM + c * W), pb.softcap));
  if (needs_mask)
    for (int j = 0; j < n_scored; ++j)
      for (int r = 0; r < BM; ++r)
        if (j >= n || !visible(pb, keys[j], p0 + r, listed != nullptr && listed[j])) st[j * BM + r] = kNegInf;
  // Online softmax over the tile, BM rows at a time per vector.
  for (int c = 0; c < NQ; ++c) {
    Isa::vec tile_max = Isa::set1(kNegInf);
    for (int j = 0; j < n_scored; ++j) tile_max = Isa::max(tile_max, Isa::load(st + j * BM + c * W));
    const Isa::vec m_old = Isa::load(s.m.data() + c * W);
    const Isa::vec m_new = Isa::max(m_old, tile_max);
    const Isa::vec m_sub = Isa::finite_or_zero(m_new);
    const Isa::vec alpha = Isa::exp(Isa::sub(m_old, m_sub));
    Isa::vec sum = Isa::zero();
    for (int j = 0; j < n_scored; ++j) {
      const Isa::vec p = Isa::exp(Isa::sub(Isa::load(st + j * BM + c * W), m_sub));
      Isa::store(st + j * BM + c * W, p);
      sum = Isa::add(sum, p);
    }
    Isa::store(s.m.data() + c * W, m_new);
    Isa::store(s.l.data() + c * W, Isa::fma(alpha, Isa::load(s.l.data() + c * W), sum));
    Isa::store(s.alpha.data() + c * W, alpha);
  }
  for (int r = 0; r < rows_padded; r += R)
    for (int d = 0; d < headdim; d += NV * W)
      accumulate_chunk(std::min(NV, (headdim - d) / W), st + r, s.alpha.data() + r, vrow, d, n,
                       s.o.data() + static_cast<size_t>(r) * headdim, headdim);
}

// Every row of the item sees every key of [j0, jl] (no mask needed).
inline bool whole_tile(const Problem& pb, int64_t j0, int64_t jl, int n, int rows, int64_t p0, int64_t p1) {
  if (n != BN || rows != BM || (pb.causal && jl > p0)) return false;
  const bool all_in_window = (pb.left < 0 || j0 >= p1 - pb.left) && (pb.right < 0 || jl <= p0 + pb.right);
  return all_in_window || jl < pb.sink;
}

void work_item(const Problem& pb, Scratch& s, const Seq& sq, int h, int query_block, int first_row, int rows) {
  const int headdim = pb.headdim;
  const int rows_padded = (rows + R - 1) / R * R;
  const int kv_head = h / (pb.nheads / pb.nheads_k);
  const int64_t offset = static_cast<int64_t>(sq.seqlen_k) - sq.seqlen_q;
  const int64_t p0 = first_row + offset, p1 = p0 + rows - 1;
  float* qt = s.qt.data();
  for (int r = 0; r < BM; ++r) {
    const float* qrow = sq.q + static_cast<int64_t>(first_row + std::min(r, rows - 1)) * pb.q_ss +
                        static_cast<int64_t>(h) * pb.q_sh;
    for (int d = 0; d < headdim; ++d) qt[d * BM + r] = r < rows ? qrow[d] * pb.scale : 0.0f;
  }
  std::fill(s.o.begin(), s.o.end(), 0.0f);
  std::fill(s.m.begin(), s.m.end(), kNegInf);
  std::fill(s.l.begin(), s.l.end(), 0.0f);
  const float* k_base = sq.k + static_cast<int64_t>(kv_head) * pb.k_sh;
  const float* v_base = sq.v + static_cast<int64_t>(kv_head) * pb.v_sh;
  // Keys some row may see: the window span [lo, hi) (causal: up to p1), the
  // sinks [0, sink_end) left and right of it, and listed keys outside both.
  const int64_t visible_end = pb.causal ? std::min<int64_t>(sq.seqlen_k, p1 + 1) : sq.seqlen_k;
  const int64_t hi = std::max<int64_t>(0, pb.right < 0 ? visible_end : std::min(visible_end, p1 + pb.right + 1));
  const int64_t lo = std::min(hi, pb.left < 0 ? int64_t{0} : std::max<int64_t>(0, p0 - pb.left));
  const int64_t sink_end = std::min<int64_t>(pb.sink, visible_end);
  const int64_t ranges[3][2] = {{0, std::min(sink_end, lo)}, {lo, hi}, {std::max(hi, lo), sink_end}};
  const int32_t* listed = sq.listed == nullptr ? nullptr
      : sq.listed + (static_cast<int64_t>(h) * ((sq.seqlen_q + pb.block_q - 1) / pb.block_q) + query_block) *
                        pb.listed_per_block;
  s.extra.clear();
  if (listed != nullptr) {
    s.in_list.assign(static_cast<size_t>(hi - lo), 0);
    for (int t = 0; t < pb.listed_per_block; ++t) {
      const int64_t j = listed[t];
      if (j < 0 || j >= visible_end || j < sink_end) continue;  // none, never visible, or a sink anyway
      if (j >= lo && j < hi) s.in_list[j - lo] = 1;
      else s.extra.push_back(j);
    }
  }
  int64_t* keys = s.keys.data();
  for (int t = 0; t < 3; ++t) {
    const uint8_t* flags = (t == 1 && listed != nullptr) ? s.in_list.data() : nullptr;
    for (int64_t j0 = ranges[t][0]; j0 < ranges[t][1]; j0 += BN) {
      const int n = static_cast<int>(std::min<int64_t>(BN, ranges[t][1] - j0));
      for (int j = 0; j < n; ++j) keys[j] = j0 + j;
      const bool whole = whole_tile(pb, j0, j0 + n - 1, n, rows, p0, p1);
      key_tile(pb, s, rows_padded, k_base, v_base, keys, flags == nullptr ? nullptr : flags + (j0 - lo), n, p0,
               !whole);
    }
  }
  static const std::array<uint8_t, BN> kAllListed = [] {
    std::array<uint8_t, BN> flags{};
    flags.fill(1);
    return flags;
  }();
  for (size_t e0 = 0; e0 < s.extra.size(); e0 += BN) {
    const int n = static_cast<int>(std::min<size_t>(BN, s.extra.size() - e0));
    int64_t last = 0;
    for (int j = 0; j < n; ++j) last = std::max(last, keys[j] = s.extra[e0 + j]);
    // listed keys are seen by every row, up to causality
    const bool whole = n == BN && rows == BM && (!pb.causal || last <= p0);
    key_tile(pb, s, rows_padded, k_base, v_base, keys, kAllListed.data(), n, p0, !whole);
  }
  for (int r = 0; r < rows; ++r) {
    float* orow = sq.out + static_cast<int64_t>(first_row + r) * pb.o_ss + static_cast<int64_t>(h) * pb.o_sh;
    float* lse = sq.lse + static_cast<int64_t>(h) * sq.lse_sh + first_row + r;
    const float l = s.l[r];
    if (l > 0) {
      const float inv = 1.0f / l;
      for (int d = 0; d < headdim; ++d) orow[d] = s.o[static_cast<size_t>(r) * headdim + d] * inv;
      *lse = s.m[r] + std::log(l);
    } else {
      for (int d = 0; d < headdim; ++d) orow[d] = 0.0f;
      *lse = kNegInf;
    }
  }
}

// Runs items [0, items) on num_threads threads; item(it, s) does one. Each
// item is computed by one thread in a fixed order: results do not depend on
// the thread count or the schedule.
template <class Item>
void run_items(int64_t items, int headdim, int num_threads, const Item& item) {
#pragma omp parallel num_threads(num_threads)
  {
    Scratch s(headdim);
    // Items differ in cost (causal rows see more keys the later they sit): hand them out dynamically.
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) item(it, s);
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

// Returns 0, or 1 for arguments it cannot take, 2 when built without AVX2.
extern "C" int longattn_flash_cpu(
    const float* q, int64_t q_sb, int64_t q_ss, int64_t q_sh,
    const float* k, int64_t k_sb, int64_t k_ss, int64_t k_sh,
    const float* v, int64_t v_sb, int64_t v_ss, int64_t v_sh,
    float* out, int64_t o_sb, int64_t o_ss, int64_t o_sh, float* lse,
    int batch, int seqlen_q, int seqlen_k, int nheads, int nheads_k, int headdim,
    int window_left, int window_right, int sink, int causal, float scale, float softcap,
    const int32_t* listed, int listed_per_block, int block_q, int num_threads) {
#ifdef LONGATTN_AVX2
  if (batch < 1 || seqlen_q < 1 || seqlen_k < 0 || nheads_k < 1 || nheads % nheads_k || headdim < W ||
      headdim % W || sink < 0 || num_threads < 1 || (listed != nullptr && (block_q < 1 || listed_per_block < 0)))
    return 1;
  // Items never straddle two query blocks of a listing: each block of block_q
  // rows splits into pieces of at most BM rows.
  const int bq = listed == nullptr ? BM : block_q;
  const Problem pb{q_ss, q_sh, k_ss, k_sh, v_ss, v_sh, o_ss, o_sh, nheads, nheads_k, headdim, window_left,
                   window_right, sink, causal != 0, scale, softcap, listed_per_block, bq};
  const int blocks = (seqlen_q + bq - 1) / bq, pieces = (bq + BM - 1) / BM;
  const int64_t items = static_cast<int64_t>(batch) * nheads * blocks * pieces;
  run_items(items, headdim, num_threads, [&](int64_t it, Scratch& s) {
    const int piece = static_cast<int>(it % pieces);
    const int block = static_cast<int>((it / pieces) % blocks);
    const int h = static_cast<int>((it / pieces / blocks) % nheads);
    const int64_t b = it / pieces / blocks / nheads;
    const int first_row = block * bq + piece * BM;
    const int rows = std::min({BM, bq - piece * BM, seqlen_q - first_row});
    if (rows <= 0) return;
    const Seq sq{q + b * q_sb, k + b * k_sb, v + b * v_sb, out + b * o_sb,
                 lse + b * nheads * seqlen_q, seqlen_q,
                 listed == nullptr ? nullptr : listed + b * nheads * blocks * listed_per_block,
                 seqlen_q, seqlen_k};
    work_item(pb, s, sq, h, block, first_row, rows);
  });
  return 0;
#else
  (void)q; (void)q_sb; (void)q_ss; (void)q_sh; (void)k; (void)k_sb; (void)k_ss; (void)k_sh; (void)v; (void)v_sb;
  (void)v_ss; (void)v_sh; (void)out; (void)o_sb; (void)o_ss; (void)o_sh; (void)lse; (void)batch; (void)seqlen_q;
  (void)seqlen_k; (void)nheads; (void)nheads_k; (void)headdim; (void)window_left; (void)window_right; (void)sink;
  (void)causal; (void)scale; (void)softcap; (void)listed; (void)listed_per_block; (void)block_q; (void)num_threads;
  return 2;
#endif
}

// Varlen (packed sequences, flash-attn's flash_attn_varlen_func layout):
//   q, out (total_q, nheads, headdim); k, v (total_k, nheads_k, headdim); lse (nheads, total_q) contiguous;
//   cu_seqlens_q, cu_seqlens_k (batch + 1) int32 prefix sums: sequence b's queries are rows
//   cu_seqlens_q[b] .. cu_seqlens_q[b + 1], its keys rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1],
//   and its query i sits at key position i + seqlen_k_b - seqlen_q_b (each sequence aligned on its own).
// Work items are (sequence, head, block of BM query rows), numbered sequence by
// sequence, each exactly the dense kernel's item on that sequence alone (same
// bits); no padding to the longest sequence. Sequences of length 0 (either
// side) are allowed: no queries, no items; no keys, rows out 0 and lse -inf.
// Returns 0, or 1 for arguments it cannot take (prefix sums included), 2 when built without AVX2.
extern "C" int longattn_flash_cpu_varlen(
    const float* q, int64_t q_ss, int64_t q_sh,
    const float* k, int64_t k_ss, int64_t k_sh,
    const float* v, int64_t v_ss, int64_t v_sh,
    float* out, int64_t o_ss, int64_t o_sh, float* lse,
    const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, int batch, int64_t total_q, int64_t total_k,
    int nheads, int nheads_k, int headdim, int window_left, int window_right, int sink, int causal, float scale,
    float softcap, int num_threads) {
#ifdef LONGATTN_AVX2
  if (batch < 1 || total_q < 0 || total_k < 0 || nheads < 1 || nheads_k < 1 || nheads % nheads_k ||
      headdim < W || headdim % W || sink < 0 || num_threads < 1 || cu_seqlens_q == nullptr ||
      cu_seqlens_k == nullptr || cu_seqlens_q[0] != 0 || cu_seqlens_k[0] != 0 || cu_seqlens_q[batch] != total_q ||
      cu_seqlens_k[batch] != total_k)
    return 1;
  // first_item[b]: the number of the sequence's first item (a prefix sum over
  // sequences of nheads * its query blocks); an item finds its sequence by bisection.
  std::vector<int64_t> first_item(static_cast<size_t>(batch) + 1, 0);
  for (int b = 0; b < batch; ++b) {
    const int64_t sq = static_cast<int64_t>(cu_seqlens_q[b + 1]) - cu_seqlens_q[b];
    const int64_t sk = static_cast<int64_t>(cu_seqlens_k[b + 1]) - cu_seqlens_k[b];
    if (sq < 0 || sk < 0) return 1;
    first_item[b + 1] = first_item[b] + nheads * ((sq + BM - 1) / BM);
  }
  const Problem pb{q_ss, q_sh, k_ss, k_sh, v_ss, v_sh, o_ss, o_sh, nheads, nheads_k, headdim, window_left,
                   window_right, sink, causal != 0, scale, softcap, 0, BM};
  run_items(first_item[batch], headdim, num_threads, [&](int64_t it, Scratch& s) {
    // The last sequence whose first item is <= it (sequences without queries own no items).
    const int b = static_cast<int>(std::upper_bound(first_item.begin(), first_item.end(), it) - first_item.begin()) - 1;
    const int64_t q0 = cu_seqlens_q[b], k0 = cu_seqlens_k[b];
    const int seqlen_q = cu_seqlens_q[b + 1] - cu_seqlens_q[b], seqlen_k = cu_seqlens_k[b + 1] - cu_seqlens_k[b];
    const int blocks = (seqlen_q + BM - 1) / BM;
    const int64_t local = it - first_item[b];
    const int h = static_cast<int>(local / blocks), block = static_cast<int>(local % blocks);
    const int first_row = block * BM;
    const Seq sq{q + q0 * q_ss, k + k0 * k_ss, v + k0 * v_ss, out + q0 * o_ss, lse + q0, total_q, nullptr,
                 seqlen_q, seqlen_k};
    work_item(pb, s, sq, h, block, first_row, std::min(BM, seqlen_q - first_row));
  });
  return 0;
#else
  (void)q; (void)q_ss; (void)q_sh; (void)k; (void)k_ss; (void)k_sh; (void)v; (void)v_ss; (void)v_sh; (void)out;
  (void)o_ss; (void)o_sh; (void)lse; (void)cu_seqlens_q; (void)cu_seqlens_k; (void)batch; (void)total_q;
  (void)total_k; (void)nheads; (void)nheads_k; (void)headdim; (void)window_left; (void)window_right; (void)sink;
  (void)causal; (void)scale; (void)softcap; (void)num_threads;
  return 2;
#endif
}
