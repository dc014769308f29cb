// Stream-K (LeanAttention) decode attention on the CPU.
//
// One OpenMP thread per stream-K worker. Worker c walks its segments (a run
// of LeanTiles = block_n keys of one (batch, kv_head) output tile, the whole
// query group folded into rows) and streams each K/V row of the cache once;
// scores and the online softmax are float32. A worker that covers a whole
// tile writes the output; otherwise it writes a normalised partial (out, lse)
// to its own slot, and after the workers finish, each tile's partials are
// merged in slot order (= worker order = key order): deterministic, no
// atomics, no waiting. The plan comes from longattn/decode/plan.py
// (DecodePlan.as_tensors).
//
// Two segment paths, the same contract:
// - run_segment_wide (AVX2 builds, headdim % kWide == 0): one key per vector
//   lane, kWide = 16 keys per chunk with AVX-512 and 8 with AVX2, so a row's
//   scores are one vector and the online softmax is a few vector ops per
//   chunk (the running max moves, and the accumulator is rescaled, only when
//   a score exceeds it); dot products without a horizontal sum per key
//   (ReduceKeys); bf16 through vdpbf16ps for QK and PV when the build has
//   AVX512-BF16 (P rounded to bf16 for PV, as flash-attention does on GPUs;
//   the softmax denominator and lse use the fp32 P), else widened in
//   registers (two vectors per load, even and odd elements, when headdim %
//   (2 * kWide) == 0: attn_rows.h's Bf16Pairs); each chunk's K, then its V, walked in the cache's address
//   order (4 key positions at a time over every kv head of the tile, not one
//   head's keys a whole key position apart); the K/V rows of a chunk 2
//   chunks ahead prefetched a few lines at a time between the dot products.
//   Measured on a Zen 4 EPYC at 128k keys, batch 1, two threads, same
//   process: AVX-512 1.6x (fp32) and 2.0x (bf16) the 8-key path with the
//   head-by-head walk, and the address-order walk 1.2-1.3x faster than that;
//   the AVX2 build 1.45x (fp32) and 2.1x (bf16) its 8-key path.
// - run_segment (portable builds, and head dims not a multiple of kWide): 8
//   keys per chunk through the row micro-kernels of attn_rows.h (shared with
//   gather_decode.cpp).
//
// Layouts (element strides; the innermost headdim stride is 1):
//   q      (batch, seqlen_q, nheads, headdim)
//   cache  contiguous (batch, max_seqlen, nheads_k, headdim), or
//          paged (num_pages, page_size, nheads_k, headdim) + block_table (batch, max_pages)
//   out    (batch, seqlen_q, nheads, headdim) contiguous, lse (batch, nheads, seqlen_q)
// Query i of sequence b sits at key position seqlens[b] - seqlen_q + i
// (bottom-right); window (left, right), -1 = unbounded, causal folded in.
// Rows that see no key keep out = 0, lse = -inf (the caller initialises them).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "attn_rows.h"  // dtypes, row loads/stores, the QK/PV micro-kernels, softmax helpers

namespace {

constexpr int kChunk = 8;  // run_segment's keys per chunk (8 beat 16 and 32 at 128k when AVX2 builds ran this path: less L1 pressure)

struct Problem {
  const char* q; int64_t q_sb, q_sm, q_sh;
  const char* k; const char* v; int64_t c_s0, c_s1, c_sh;  // cache strides (same for k and v)
  int dtype;
  const int32_t* seqlens;
  const int32_t* block_table; int64_t bt_stride; int page_size;  // block_table null: contiguous
  int seqlen_q, nheads, nheads_k, headdim;
  float scale; int left, right; float softcap;
  int block_n, heads_per_tile;
  float* partial_out; float* partial_lse;
  char* out; float* lse;
};

// Byte offset of key `pos` of sequence `b`, kv head `hk`, in the cache.
inline int64_t key_offset(const Problem& p, int b, int pos, int hk) {
  int64_t row;
  if (p.block_table == nullptr) {
    row = static_cast<int64_t>(b) * p.c_s0 + static_cast<int64_t>(pos) * p.c_s1;
  } else {
    int64_t page = p.block_table[static_cast<int64_t>(b) * p.bt_stride + pos / p.page_size];
    row = page * p.c_s0 + static_cast<int64_t>(pos % p.page_size) * p.c_s1;
  }
  return (row + static_cast<int64_t>(hk) * p.c_sh) * elem_size(p.dtype);
}

// Per-thread scratch, reused across segments.
struct Scratch {
  std::vector<float> q, acc, m, l, s, kbuf, vbuf;
  std::vector<uint16_t> q_bf16;  // unscaled bf16 q rows, for the vdpbf16ps path
  const void* krow[kChunk];
  const void* vrow[kChunk];
#ifdef LONGATTN_AVX2
  // The lane-per-key fast path (run_segment_wide): per row kWide
  // probabilities (fp32, or bf16 pairs for vdpbf16ps) and kWide lanes of the
  // softmax denominator.
  std::vector<float> pw, lw;
  std::vector<uint32_t> ppw;
  std::vector<float> red;  // per row the chunk's stored ReduceKeys state (kReduceFloats)
  std::vector<int64_t> key_lo, key_hi;  // per row its visible key positions [lo, hi)
#endif
  void resize(int rows, int heads, int headdim) {
#ifdef LONGATTN_AVX2
    pw.resize(static_cast<size_t>(rows) * kWide);
    lw.resize(static_cast<size_t>(rows) * kWide);
    ppw.resize(static_cast<size_t>(rows) * kWide / 2);
    red.resize(static_cast<size_t>(rows) * kReduceFloats);
    key_lo.resize(rows); key_hi.resize(rows);
#endif
    q.resize(static_cast<size_t>(rows) * headdim);
    q_bf16.resize(static_cast<size_t>(rows) * headdim);
    acc.resize(static_cast<size_t>(rows) * headdim);
    m.resize(rows); l.resize(rows);
    s.resize(static_cast<size_t>(rows) * kChunk);
    kbuf.resize(static_cast<size_t>(heads) * kChunk * headdim);
    vbuf.resize(static_cast<size_t>(heads) * kChunk * headdim);
  }
};

// The q rows of a tile into w.q (fp32, scaled) and w.q_bf16 (bf16 as given).
// Rows are ordered (kv head, group member g, query i): row = (hl * group + g) * Sq + i.
void load_q(const Problem& p, Scratch& w, int b, int hk0) {
  const int D = p.headdim, Sq = p.seqlen_q, group = p.nheads / p.nheads_k;
  const int es = elem_size(p.dtype);
  for (int hl = 0; hl < p.heads_per_tile; ++hl)
    for (int g = 0; g < group; ++g)
      for (int i = 0; i < Sq; ++i) {
        const int r = (hl * group + g) * Sq + i, h = (hk0 + hl) * group + g;
        const char* src = p.q + (static_cast<int64_t>(b) * p.q_sb + static_cast<int64_t>(i) * p.q_sm +
                                 static_cast<int64_t>(h) * p.q_sh) * es;
        float* qr = &w.q[static_cast<size_t>(r) * D];
        load_row(src, p.dtype, qr, D);
        if (p.dtype == kBF16) std::memcpy(&w.q_bf16[static_cast<size_t>(r) * D], src, sizeof(uint16_t) * D);
        // Scale once here rather than every score later.
#pragma omp simd
        for (int d = 0; d < D; ++d) qr[d] *= p.scale;
      }
}

// A segment's start: its q rows loaded, accumulators zero and running maxima -inf
// (each path then zeroes its own running sums).
void begin_segment(const Problem& p, Scratch& w, int b, int hk0, int rows) {
  load_q(p, w, b, hk0);
  std::fill(w.acc.begin(), w.acc.begin() + static_cast<size_t>(rows) * p.headdim, 0.0f);
  std::fill(w.m.begin(), w.m.begin() + rows, kNegInf);
}

// Normalise the tile's rows and write them: the output (whole tile) or a partial slot.
void finish_rows(const Problem& p, Scratch& w, int b, int hk0, bool whole_tile, int slot) {
  const int D = p.headdim, Sq = p.seqlen_q, group = p.nheads / p.nheads_k;
  const int rows = p.heads_per_tile * group * Sq;
  const int es = elem_size(p.dtype);
  for (int r = 0; r < rows; ++r) {
    float* ar = &w.acc[static_cast<size_t>(r) * D];
    const float row_lse = normalise_row(ar, w.l[r], w.m[r], D);
    const int i = r % Sq, h = hk0 * group + r / Sq;  // r / Sq = hl * group + g
    if (whole_tile) {
      const int64_t o = (static_cast<int64_t>(b) * Sq + i) * p.nheads + h;
      store_row(ar, p.dtype, p.out + o * D * es, D);
      p.lse[(static_cast<int64_t>(b) * p.nheads + h) * Sq + i] = row_lse;
    } else {
      std::memcpy(p.partial_out + (static_cast<int64_t>(slot) * rows + r) * D, ar, sizeof(float) * D);
      p.partial_lse[static_cast<int64_t>(slot) * rows + r] = row_lse;
    }
  }
}

// One segment: keys [key_begin, key_end) of sequence b for kv heads
// [hk0, hk0 + heads_per_tile) and every row of their query groups; 8 keys
// at a time (portable builds, and head dims not a multiple of kWide).
void run_segment(const Problem& p, Scratch& w, int b, int hk0, int key_begin, int key_end,
                 bool whole_tile, int slot) {
  const int D = p.headdim, Sq = p.seqlen_q, group = p.nheads / p.nheads_k;
  const int head_rows = group * Sq, rows = p.heads_per_tile * head_rows;
  const int L = p.seqlens[b];
  const int es = elem_size(p.dtype);
  begin_segment(p, w, b, hk0, rows);
  std::fill(w.l.begin(), w.l.begin() + rows, 0.0f);
  const int64_t head_bytes = p.c_sh * es;

  for (int c0 = key_begin; c0 < key_end; c0 += kChunk) {
    const int n = std::min(kChunk, key_end - c0);
    // With AVX2 the micro-kernels read every dtype in place (fp16/bf16 are
    // widened in registers). Without it, half types are first widened into
    // L2-resident fp32 buffers, position by position in address order.
#ifdef LONGATTN_AVX2
    const bool widen = false;  // the micro-kernels widen in registers
#else
    const bool widen = p.dtype != kF32;
#endif
    const int row_dtype = widen ? kF32 : p.dtype;
    if (widen) {
      for (int j = 0; j < n; ++j) {
        const char* kp = p.k + key_offset(p, b, c0 + j, hk0);
        const char* vp = p.v + key_offset(p, b, c0 + j, hk0);
        for (int hl = 0; hl < p.heads_per_tile; ++hl) {
          const size_t at = (static_cast<size_t>(hl) * kChunk + j) * D;
          load_row(kp + hl * head_bytes, p.dtype, &w.kbuf[at], D);
          load_row(vp + hl * head_bytes, p.dtype, &w.vbuf[at], D);
        }
      }
    }
#ifdef LONGATTN_AVX2
    const int next_n = std::min(kChunk, key_end - c0 - n);
#endif
    for (int hl = 0; hl < p.heads_per_tile; ++hl) {
#ifdef LONGATTN_AVX2
      // Prefetch the next chunk while this one computes, a slice per head so
      // DRAM stays busy through the compute instead of idling between bursts;
      // into L2 (T1): the AVX2 build at 128k keys ran 1.27x (fp32) and 1.37x
      // (bf16) faster than with T0 (Zen 4, A/B in one process), as the
      // AVX-512 path found; 4 chunks ahead instead of 1 measured the same.
      const int pf_begin = hl * next_n / p.heads_per_tile, pf_end = (hl + 1) * next_n / p.heads_per_tile;
      for (int j = pf_begin; j < pf_end; ++j) {
        const char* nk = p.k + key_offset(p, b, c0 + n + j, hk0);
        const char* nv = p.v + key_offset(p, b, c0 + n + j, hk0);
        for (int h2 = 0; h2 < p.heads_per_tile; ++h2)
          for (int off = 0; off < D * es; off += 64) {
            _mm_prefetch(nk + h2 * head_bytes + off, _MM_HINT_T1);
            _mm_prefetch(nv + h2 * head_bytes + off, _MM_HINT_T1);
          }
      }
#endif
      for (int j = 0; j < n; ++j) {
        if (widen) {
          const size_t at = (static_cast<size_t>(hl) * kChunk + j) * D;
          w.krow[j] = &w.kbuf[at];
          w.vrow[j] = &w.vbuf[at];
        } else {
          w.krow[j] = p.k + key_offset(p, b, c0 + j, hk0 + hl);
          w.vrow[j] = p.v + key_offset(p, b, c0 + j, hk0 + hl);
        }
      }
      const int r0 = hl * head_rows;
      float* s_head = &w.s[static_cast<size_t>(r0) * kChunk];
#ifdef LONGATTN_AVX512BF16
      if (row_dtype == kBF16)
        qk_block_bf16dot(&w.q_bf16[static_cast<size_t>(r0) * D], head_rows, D, w.krow, n, s_head, kChunk, p.scale);
      else
#endif
        qk_block(&w.q[static_cast<size_t>(r0) * D], head_rows, D, row_dtype, w.krow, n, s_head, kChunk);
      for (int r = r0; r < r0 + head_rows; ++r) {
        float* sr = &w.s[static_cast<size_t>(r) * kChunk];
        const int qpos = L - Sq + (r % Sq);
        // Visible keys of this row within the chunk: [lo, hi). In int64: qpos + right
        // wraps int for a huge window (INT_MAX as "everything").
        const int64_t lo_pos = p.left >= 0 ? int64_t{qpos} - p.left : 0;
        const int64_t hi_pos = p.right >= 0 ? int64_t{qpos} + p.right + 1 : L;
        const int lo = static_cast<int>(std::max<int64_t>(lo_pos - c0, 0));
        const int hi = static_cast<int>(std::min<int64_t>(hi_pos - c0, n));
        float chunk_max;
        if (lo == 0 && hi == n && p.softcap <= 0.0f) {
          chunk_max = row_max(sr, n);  // the common case: every key visible, nothing to rewrite
        } else {
          chunk_max = kNegInf;
          for (int j = 0; j < n; ++j) {
            float sc = sr[j];
            if (p.softcap > 0.0f) sc = p.softcap * std::tanh(sc / p.softcap);
            sc = (j < lo || j >= hi) ? kNegInf : sc;
            sr[j] = sc;
            chunk_max = std::max(chunk_max, sc);
          }
        }
        // Nothing visible for this row here: contribute nothing. (row_max
        // passes over NaN; a chunk whose scores are NaN, NaN in q or k, goes on
        // and makes the row NaN, as dense attention's is.)
        if (chunk_max == kNegInf && std::none_of(sr, sr + n, [](float x) { return std::isnan(x); })) {
          std::fill(sr, sr + n, 0.0f);
          continue;
        }
        fold_chunk(sr, n, chunk_max, &w.m[r], &w.l[r], &w.acc[static_cast<size_t>(r) * D], D);
      }
      pv_block(s_head, head_rows, kChunk, row_dtype, w.vrow, n, &w.acc[static_cast<size_t>(r0) * D], D);
    }
  }
  finish_rows(p, w, b, hk0, whole_tile, slot);
}

#ifdef LONGATTN_AVX2
// Keys ahead of the chunk being computed that are prefetched (into L2), a
// whole key position (every head of the tile) at a time, in address order.
// Still needed with the address-order walk (without it: 1.5-2x slower at
// 128k keys on Zen 4); 16 to 96 keys ahead measured the same.
constexpr int kPrefetchKeys = 2 * kWide;
// Keys per PV step of the address-order walk: 8 with AVX-512, the whole
// 8-key chunk with AVX2. Each head's accumulators make one round trip
// through L1 per step; with the cache in L1, 8 keys instead of 4 took
// 15% fewer cycles per key in fp32 and 26% fewer in bf16 (Zen 4, A/B in
// one process), and from memory the same (fp32) or a few percent faster
// (bf16); 16 keys was no better. (With the prefetch issued at a fixed
// count per step, 8 and 16 had measured slower from memory.)
#ifdef LONGATTN_AVX512
constexpr int kPvKeys = 8;
#else
constexpr int kPvKeys = kWide;
#endif
// The lane-per-key fast path (kWide = 16 keys per chunk with AVX-512, 8 with
// AVX2; headdim % kWide == 0), the same contract as run_segment. T is the cache's element type (float, _Float16, bf16 as
// uint16_t; half types widened in registers), kDot: bf16 with vdpbf16ps for
// QK and PV (P rounded to bf16), ND = headdim / 16 when fixed at compile time
// (the dot product loops unrolled), else 0. The walk below is described for
// AVX-512's 16 keys; with AVX2 a chunk is 8 keys, the same walk.
//
// Per 16-key chunk, three passes:
// - QK in the cache's address order: 4 key positions at a time, every kv
//   head of them (with the tile folding every kv head of a sequence, 4 x
//   nheads_k x headdim contiguous elements; paged caches are contiguous
//   within a page), each K vector loaded once for a head's query rows and the
//   16 keys' sums kept per row as stored ReduceKeys state. Walking one head's
//   16 keys at a time instead (rows a whole key position apart, 4 KiB in
//   fp32 at 8 heads of 128) took 1.2-1.3x as long at 128k keys on Zen 4.
// - the online softmax per row: the row's 16 scores are one vector; the
//   running max only moves (and the accumulator is rescaled) when a score
//   exceeds it, which after the first chunks is rare, so the common chunk
//   costs one compare, one vector exp and one add; the denominator is kept as
//   16 lanes per row and summed at the end.
// - PV in address order too, kPvKeys = 8 key positions (4 bf16 pairs; with
//   AVX2 the whole 8-key chunk) at a time over every head: each head's
//   accumulators go through L1 once per 8 keys.
// Per (row, key) the arithmetic and its order are those of a head-by-head
// walk: the address order changes no bit of the result.
template <typename T, bool kDot, int ND>
__attribute__((noinline)) void run_segment_wide(const Problem& p, Scratch& w, int b, int hk0, int key_begin, int key_end,
                      bool whole_tile, int slot) {
  const int D = p.headdim, Sq = p.seqlen_q, group = p.nheads / p.nheads_k;
  const int head_rows = group * Sq, rows = p.heads_per_tile * head_rows;
  const int L = p.seqlens[b];
  const int es = elem_size(p.dtype);
  begin_segment(p, w, b, hk0, rows);
  if constexpr (kIsPairs<T>) permute_columns<2 * kWide>(w.q.data(), rows, D, pair_column, true);  // q in the K vectors' column order
  std::fill(w.lw.begin(), w.lw.begin() + static_cast<size_t>(rows) * kWide, 0.0f);
  const int64_t head_bytes = p.c_sh * es;
  // Bytes of one key position over the tile's heads (adjacent in both cache layouts).
  const int64_t key_bytes = (p.heads_per_tile - 1) * head_bytes + static_cast<int64_t>(D) * es;
  // Plain pointers in the hot loop: the scratch is thread_local, and its
  // address must not be looked up again per use.
  float* const acc = w.acc.data();
  float* const m_run = w.m.data();
  float* const lw = w.lw.data();
  float* const red = w.red.data();
  [[maybe_unused]] float* const pw = w.pw.data();      // fp32 PV only
  [[maybe_unused]] uint32_t* const ppw = w.ppw.data();  // bf16 dot path only
  [[maybe_unused]] const float* const q32 = w.q.data();
  [[maybe_unused]] const uint16_t* const q16 = w.q_bf16.data();
  const char* kbase[kWide];
  const char* vbase[kWide];
  // Each row's visible key positions [lo, hi), once per segment (in int64:
  // qpos + right wraps int for a huge window, INT_MAX as "everything"), and
  // the positions every row sees: a chunk inside them needs no masking.
  int64_t* const key_lo = w.key_lo.data();
  int64_t* const key_hi = w.key_hi.data();
  int64_t all_lo = 0, all_hi = L;
  for (int r = 0; r < rows; ++r) {
    const int qpos = L - Sq + (r % Sq);
    key_lo[r] = p.left >= 0 ? int64_t{qpos} - p.left : 0;
    key_hi[r] = p.right >= 0 ? int64_t{qpos} + p.right + 1 : L;
    all_lo = std::max(all_lo, key_lo[r]);
    all_hi = std::min(all_hi, key_hi[r]);
  }

  for (int c0 = key_begin; c0 < key_end; c0 += kWide) {
    const int n = std::min(kWide, key_end - c0);
    // Lanes past n point at key n-1 (read, then masked out): every pointer is a real row.
    for (int j = 0; j < kWide; ++j) {
      const int64_t off = key_offset(p, b, c0 + std::min(j, n - 1), hk0);
      kbase[j] = p.k + off;
      vbase[j] = p.v + off;
    }
    // The chunk kPrefetchKeys ahead, at the pace of this chunk's compute (see Prefetcher).
    Prefetcher pf;
    const int pf0 = c0 + kPrefetchKeys;
    constexpr int kPfBytes = 64 * Prefetcher::kPrefetchLines;
    pf.nkeys = std::max(0, std::min(kWide, key_end - pf0));
    // Whole issues per key (may pass the key's last byte by less than one issue: harmless).
    pf.lines = static_cast<int>((key_bytes + kPfBytes - 1) / kPfBytes * Prefetcher::kPrefetchLines);
    for (int j = 0; j < pf.nkeys; ++j) {
      const int64_t off = key_offset(p, b, pf0 + j, hk0);
      pf.k[j] = p.k + off;
      pf.v[j] = p.v + off;
    }
    pf.issues = int64_t{pf.nkeys} * (pf.lines / Prefetcher::kPrefetchLines);
    // The chunk's work in the units the micro-kernels pass to step(): their
    // vector multiply-adds. QK scores every row against all kWide keys, D /
    // kWide FMAs per key (bf16 dot: D / 32); PV adds the chunk's n keys into
    // every row, D / kWide FMAs per key (bf16 dot: D / 16 per key pair, the
    // pairs formed within each group of kPvKeys keys).
    const int64_t qk_work = int64_t{rows} * kWide * (kDot ? D / 32 : D / kWide);
    const int pv_pairs = (n / kPvKeys) * (kPvKeys / 2) + (n % kPvKeys + 1) / 2;
    const int64_t pv_work = int64_t{rows} * (kDot ? int64_t{pv_pairs} * (D / 16) : int64_t{n} * (D / kWide));
    pf.work = qk_work + pv_work;

    // QK, 4 key positions at a time over every head (address order).
    for (int g = 0; g < kWide / 4; ++g) {
      for (int hl = 0; hl < p.heads_per_tile; ++hl) {
        const char* k4[4];
        for (int u = 0; u < 4; ++u) k4[u] = kbase[4 * g + u] + hl * head_bytes;
        const int r0 = hl * head_rows;
        float* red_head = red + static_cast<size_t>(r0) * kReduceFloats;
        if constexpr (kDot) {
#ifdef LONGATTN_AVX512BF16
          qk4_block_bf16dot<ND / 2>(q16 + static_cast<size_t>(r0) * D, head_rows, D, k4, red_head, g, pf);
#endif
        } else {
          qk4_block<ND, T>(q32 + static_cast<size_t>(r0) * D, head_rows, D, k4, red_head, g, pf);
        }
      }
    }

    // The online softmax, row by row.
    const bool every_key_visible = n == kWide && c0 >= all_lo && c0 + kWide <= all_hi;
    for (int r = 0; r < rows; ++r) {
      WVec s = ReduceKeys::finish_stored(red + static_cast<size_t>(r) * kReduceFloats);
      if constexpr (kDot) s = Isa::mul(s, Isa::set1(p.scale));  // bf16 q is unscaled
      if (p.softcap > 0.0f) {
        alignas(64) float t[kWide];
        Isa::store(t, s);
        for (int j = 0; j < kWide; ++j) t[j] = p.softcap * std::tanh(t[j] / p.softcap);
        s = Isa::load(t);
      }
      if (!every_key_visible) {  // visible keys of this row within the chunk: [lo, hi); the others -inf
        const int lo = static_cast<int>(std::min<int64_t>(std::max<int64_t>(key_lo[r] - c0, 0), kWide));
        const int hi = static_cast<int>(std::max<int64_t>(std::min<int64_t>(key_hi[r] - c0, n), 0));
        s = Isa::keep_lanes(s, lo, hi);
      }
      float m = m_run[r];
      float* lr = lw + static_cast<size_t>(r) * kWide;
      if (Isa::any_greater(s, m)) {  // a new running max
        const float m_new = Isa::hmax(s);
        if (m != kNegInf) {  // rows that saw nothing yet have acc = 0, l = 0: nothing to rescale
          const float alpha = std::exp(m - m_new);
          float* ar = acc + static_cast<size_t>(r) * D;
          const WVec av = Isa::set1(alpha);
          for (int d = 0; d < D; d += kWide) Isa::store(ar + d, Isa::mul(Isa::load(ar + d), av));
          Isa::store(lr, Isa::mul(Isa::load(lr), av));
        }
        m = m_run[r] = m_new;
      }
      // exp(-inf - m) = 0 for hidden lanes. A row with no score above -inf so
      // far (m = -inf) has lanes of -inf (adding 0) or NaN (NaN in q or k:
      // adding NaN, so the row is NaN as dense attention's is), hence m as 0.
      const WVec pv = Isa::exp(Isa::sub(s, Isa::set1(m == kNegInf ? 0.0f : m)));
      Isa::store(lr, Isa::add(Isa::load(lr), pv));  // the denominator from unrounded p
      if constexpr (kDot) {
#ifdef LONGATTN_AVX512BF16
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ppw + static_cast<size_t>(r) * (kWide / 2)),
                            (__m256i)_mm512_cvtneps_pbh(pv));
#endif
      } else {
        Isa::store(pw + static_cast<size_t>(r) * kWide, pv);
      }
    }

    // PV, kPvKeys key positions at a time over every head (address order).
    for (int j0 = 0; j0 < n; j0 += kPvKeys) {
      const int n4 = std::min(kPvKeys, n - j0);
      for (int hl = 0; hl < p.heads_per_tile; ++hl) {
        const char* v4[kPvKeys];
        for (int u = 0; u < kPvKeys; ++u) v4[u] = vbase[j0 + u] + hl * head_bytes;
        const int r0 = hl * head_rows;
        float* acc_head = acc + static_cast<size_t>(r0) * D;
        if constexpr (kDot) {
#ifdef LONGATTN_AVX512BF16
          pv16_bf16dot_block(ppw + static_cast<size_t>(r0) * (kWide / 2) + j0 / 2, head_rows, kWide / 2, v4, n4,
                             acc_head, D, pf);
#endif
        } else {
          pv_lanes_block<T>(pw + static_cast<size_t>(r0) * kWide + j0, head_rows, kWide, v4, n4, acc_head, D, pf);
        }
      }
    }
  }
  for (int r = 0; r < rows; ++r) w.l[r] = Isa::hsum(Isa::load(lw + static_cast<size_t>(r) * kWide));
  if constexpr (kDot) {
#ifdef LONGATTN_AVX512BF16
    // Undo the accumulator's column permutation (see pv16_bf16dot_block).
    permute_columns<32>(w.acc.data(), rows, D, bf16dot_column, false);
#endif
  }
  if constexpr (kIsPairs<T>) permute_columns<2 * kWide>(w.acc.data(), rows, D, pair_column, false);  // back to natural column order
  finish_rows(p, w, b, hk0, whole_tile, slot);
}

template <typename T, bool kDot>
void run_segment_wide_d(const Problem& p, Scratch& w, int b, int hk0, int key_begin, int key_end,
                        bool whole_tile, int slot) {
  switch (p.headdim) {  // the common head dims: the dot product loops unrolled
    case 128: return run_segment_wide<T, kDot, 128 / kWide>(p, w, b, hk0, key_begin, key_end, whole_tile, slot);
    case 64: return run_segment_wide<T, kDot, 64 / kWide>(p, w, b, hk0, key_begin, key_end, whole_tile, slot);
    default: return run_segment_wide<T, kDot, 0>(p, w, b, hk0, key_begin, key_end, whole_tile, slot);
  }
}
#endif  // LONGATTN_AVX2

// The segment through the fastest path this build and head dim allow.
void run_any_segment(const Problem& p, Scratch& w, int b, int hk0, int key_begin, int key_end,
                     bool whole_tile, int slot) {
#ifdef LONGATTN_AVX2
  if (p.headdim % kWide == 0) {
    if (p.dtype == kF32) return run_segment_wide_d<float, false>(p, w, b, hk0, key_begin, key_end, whole_tile, slot);
    if (p.dtype == kF16) return run_segment_wide_d<_Float16, false>(p, w, b, hk0, key_begin, key_end, whole_tile, slot);
#ifdef LONGATTN_AVX512BF16
    if (p.headdim % 32 == 0)
      return run_segment_wide_d<uint16_t, true>(p, w, b, hk0, key_begin, key_end, whole_tile, slot);
#endif
    if (p.headdim % (2 * kWide) == 0)  // bf16 widened a pair of vectors at a time (Bf16Pairs)
      return run_segment_wide_d<Bf16Pairs, false>(p, w, b, hk0, key_begin, key_end, whole_tile, slot);
    // Only head dims that are no multiple of 2 * kWide come here (never 64 or
    // 128): no unrolled instances, which would cost build time and never run.
    return run_segment_wide<uint16_t, false, 0>(p, w, b, hk0, key_begin, key_end, whole_tile, slot);
  }
#endif
  run_segment(p, w, b, hk0, key_begin, key_end, whole_tile, slot);
}

// Merge the partials of one tile, slots [first, last), in order.
void merge_tile(const Problem& p, int tile, int first, int last, std::vector<float>& acc) {
  const int D = p.headdim, Sq = p.seqlen_q, group = p.nheads / p.nheads_k;
  const int rows = p.heads_per_tile * group * Sq, tiles_per_seq = p.nheads_k / p.heads_per_tile;
  const int b = tile / tiles_per_seq, hk0 = (tile % tiles_per_seq) * p.heads_per_tile;
  acc.resize(D);
  for (int r = 0; r < rows; ++r) {
    float top = kNegInf;
    for (int s = first; s < last; ++s) top = std::max(top, p.partial_lse[static_cast<int64_t>(s) * rows + r]);
    const float base = top == kNegInf ? 0.0f : top;
    float total = 0.0f;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int s = first; s < last; ++s) {
      const float wgt = std::exp(p.partial_lse[static_cast<int64_t>(s) * rows + r] - base);
      if (wgt == 0.0f) continue;
      total += wgt;
      const float* po = p.partial_out + (static_cast<int64_t>(s) * rows + r) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[d] += wgt * po[d];
    }
    const bool seen = total != 0.0f;  // NaN too: a NaN partial makes the row NaN, not empty
    const float inv = seen ? 1.0f / total : 0.0f;
    for (int d = 0; d < D; ++d) acc[d] *= inv;
    const int i = r % Sq, h = hk0 * group + r / Sq;
    const int64_t o = (static_cast<int64_t>(b) * Sq + i) * p.nheads + h;
    store_row(acc.data(), p.dtype, p.out + o * D * elem_size(p.dtype), D);
    p.lse[(static_cast<int64_t>(b) * p.nheads + h) * Sq + i] = seen ? base + std::log(total) : kNegInf;
  }
}

}  // namespace

extern "C" int longattn_decode_streamk_cpu(
    const void* q, int64_t q_sb, int64_t q_sm, int64_t q_sh,
    const void* k_cache, const void* v_cache, int64_t c_s0, int64_t c_s1, int64_t c_sh,
    int dtype, const int32_t* seqlens, const int32_t* block_table, int64_t bt_stride, int page_size,
    int seqlen_q, int nheads, int nheads_k, int headdim,
    float scale, int window_left, int window_right, float softcap,
    const int32_t* segments, const int32_t* worker_first_segment, const int32_t* tile_first_partial,
    int num_workers, int num_tiles, int block_n, int heads_per_tile,
    float* partial_out, float* partial_lse, void* out, float* lse, int num_threads) {
  if (dtype < kF32 || dtype > kBF16 || headdim < 1 || nheads_k < 1 || nheads % nheads_k || heads_per_tile < 1 ||
      nheads_k % heads_per_tile)
    return 1;
  Problem p{static_cast<const char*>(q), q_sb, q_sm, q_sh,
            static_cast<const char*>(k_cache), static_cast<const char*>(v_cache), c_s0, c_s1, c_sh,
            dtype, seqlens, block_table, bt_stride, page_size,
            seqlen_q, nheads, nheads_k, headdim, scale, window_left, window_right, softcap, block_n,
            heads_per_tile, partial_out, partial_lse, static_cast<char*>(out), lse};
  const int rows = heads_per_tile * (nheads / nheads_k) * seqlen_q;
  const int tiles_per_seq = nheads_k / heads_per_tile;

  // The whole schedule, run by each thread of a team (the omp for loops split
  // it); with one thread it runs on the caller's thread without a team: a
  // small call (a few cached tokens) then pays no OpenMP region at all.
  auto run = [&]() {
    // Per thread, kept between calls: a model calls this once per layer per
    // token, and at a few cached tokens fresh buffers cost as much as the work.
    thread_local Scratch scratch;
    scratch.resize(rows, heads_per_tile, headdim);
    // Static, one worker at a time per thread: workers are equal by construction.
#pragma omp for schedule(static, 1)
    for (int c = 0; c < num_workers; ++c) {
      for (int s = worker_first_segment[c]; s < worker_first_segment[c + 1]; ++s) {
        const int32_t* seg = segments + static_cast<int64_t>(s) * 6;
        const int tile = seg[1], first = seg[2], last = seg[3];
        const int b = tile / tiles_per_seq, hk0 = (tile % tiles_per_seq) * heads_per_tile;
        const int key_begin = first * block_n;
        // last * block_n may pass INT_MAX for a sequence near 2**31 keys: min in int64.
        const int key_end = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(last) * block_n, seqlens[b]));
        run_any_segment(p, scratch, b, hk0, key_begin, key_end, seg[4] != 0, seg[5]);
      }
    }
    thread_local std::vector<float> acc;
#pragma omp for schedule(static)
    for (int t = 0; t < num_tiles; ++t) {
      if (tile_first_partial[t + 1] > tile_first_partial[t]) merge_tile(p, t, tile_first_partial[t], tile_first_partial[t + 1], acc);
    }
  };
  if (num_threads <= 1) {
    run();
  } else {
#pragma omp parallel num_threads(num_threads)
    run();
  }
  return 0;
}
