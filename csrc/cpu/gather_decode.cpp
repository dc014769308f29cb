// Gather decode attention on the CPU: each decode query attends exactly the
// cached token positions listed for it, read in place (no gathered copy).
//
// Work items ("pieces") are (batch entry b, list l, split s): entries
// [s * split_len, min((s + 1) * split_len, n)) of list l of sequence b. A list
// serves `rows = nheads / nlists` query heads: the whole query group of kv head
// l when lists are per kv head (rows = group, heads l*group .. l*group+group-1),
// or query head l alone when lists are per query head (rows = 1, kv head
// l / group). A piece walks its entries, skips -1, collects up to kChunk listed
// rows at a time (pointers straight into the contiguous or paged cache) and runs
// the decode kernel's micro-kernels (attn_rows.h) over them: every K/V row read
// once for all rows of the list, fp16/bf16 widened in registers, float32 scores
// and online softmax. While a chunk computes, the rows of the entries up to
// kPrefetch past the next chunk (scattered through memory: no hardware
// prefetcher follows them) are prefetched.
//
// A list split in several pieces writes normalised float32 partials (out, lse)
// to its own slots; after every piece is done, each list's partials are merged
// in split order. The split is chosen by the caller from the shapes alone, never
// from the thread count, and a piece's arithmetic does not depend on which
// thread runs it: results are bitwise the same for any number of threads.
//
// Layouts (element strides; the innermost headdim stride is 1):
//   q        (batch, nheads, headdim)
//   cache    contiguous (batch, capacity, nheads_k, headdim), or
//            paged (num_pages, page_size, nheads_k, headdim) + block_table (batch, max_pages)
//   indices  (batch, nlists, n) int32, contiguous; -1 = no token
//   out      (batch, nheads, headdim) contiguous, lse (batch, nheads) float32
// Every row of out and lse is written (an empty list: 0 and -inf).
// A listed position past the capacity, or one whose page is outside
// 0 .. num_pages - 1, is never read: the call returns status 2 (the Python
// wrapper checks ranges first unless asked not to; this keeps check=False safe).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "attn_rows.h"

namespace {

constexpr int kChunk = 8;  // listed rows scored at a time (as the decode kernel's keys)
#ifndef LONGATTN_GATHER_PREFETCH
#define LONGATTN_GATHER_PREFETCH 16
#endif
constexpr int kPrefetch = LONGATTN_GATHER_PREFETCH;  // entries prefetched ahead of the chunk being read

struct Gather {
  const char* q; int64_t q_sb, q_sh;
  const char* k; const char* v; int64_t c_s0, c_s1, c_sh;  // cache strides (same for k and v)
  int dtype;
  const int32_t* idx; int nlists, n;
  const int32_t* block_table; int64_t bt_stride; int page_size, num_pages;  // block_table null: contiguous
  int64_t capacity;  // positions one sequence can address
  int nheads, nheads_k, headdim;
  float scale, softcap;
  int split_len, num_splits;
  float* partial_out; float* partial_lse;
  char* out; float* lse;
};

// Byte offset of listed position `pos` (>= 0) of sequence `b`, kv head `hk`;
// -1 when the position or its page is out of range.
inline int64_t row_offset(const Gather& p, int b, int32_t pos, int hk) {
  if (pos >= p.capacity) return -1;
  int64_t row;
  if (p.block_table == nullptr) {
    row = static_cast<int64_t>(b) * p.c_s0 + static_cast<int64_t>(pos) * p.c_s1;
  } else {
    const int64_t page = p.block_table[static_cast<int64_t>(b) * p.bt_stride + pos / p.page_size];
    if (page < 0 || page >= p.num_pages) return -1;
    row = page * p.c_s0 + static_cast<int64_t>(pos % p.page_size) * p.c_s1;
  }
  return (row + static_cast<int64_t>(hk) * p.c_sh) * elem_size(p.dtype);
}

// Per-thread scratch, reused across pieces and calls.
struct Scratch {
  std::vector<float> q, acc, m, l, s, kbuf, vbuf;
  std::vector<uint16_t> q_bf16;  // unscaled bf16 q rows, for the vdpbf16ps path
  const void* krow[2][kChunk];  // current and next chunk
  const void* vrow[2][kChunk];
  void resize(int rows, int headdim) {
    q.resize(static_cast<size_t>(rows) * headdim);
    q_bf16.resize(static_cast<size_t>(rows) * headdim);
    acc.resize(static_cast<size_t>(rows) * headdim);
    m.resize(rows); l.resize(rows);
    s.resize(static_cast<size_t>(rows) * kChunk);
    kbuf.resize(static_cast<size_t>(kChunk) * headdim);
    vbuf.resize(static_cast<size_t>(kChunk) * headdim);
  }
};

// Entries [e0, e1) of list l of sequence b, for its `rows` query heads.
// Returns false if a listed position was out of range (it was skipped).
bool run_piece(const Gather& p, Scratch& w, int b, int l, int e0, int e1, bool whole, int64_t slot) {
  const int D = p.headdim, rows = p.nheads / p.nlists, group = p.nheads / p.nheads_k;
  const int h0 = l * rows, hk = h0 / group;
  const int es = elem_size(p.dtype);
  for (int r = 0; r < rows; ++r) {
    const char* src = p.q + (static_cast<int64_t>(b) * p.q_sb + static_cast<int64_t>(h0 + r) * p.q_sh) * es;
    float* qr = &w.q[static_cast<size_t>(r) * D];
    load_row(src, p.dtype, qr, D);
    if (p.dtype == kBF16) std::memcpy(&w.q_bf16[static_cast<size_t>(r) * D], src, sizeof(uint16_t) * D);
#pragma omp simd
    for (int d = 0; d < D; ++d) qr[d] *= p.scale;  // once here rather than every score later
  }
  std::fill(w.acc.begin(), w.acc.begin() + static_cast<size_t>(rows) * D, 0.0f);
  std::fill(w.m.begin(), w.m.begin() + rows, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + rows, 0.0f);

  const int32_t* list = p.idx + (static_cast<int64_t>(b) * p.nlists + l) * p.n;
  bool ok = true;
  int e = e0;
  // The next up-to-kChunk listed rows into krow/vrow[which]; -1 entries skipped.
  auto fill = [&](int which) {
    int got = 0;
    while (e < e1 && got < kChunk) {
      const int32_t pos = list[e++];
      if (pos == -1) continue;
      const int64_t off = pos < 0 ? -1 : row_offset(p, b, pos, hk);
      if (off < 0) { ok = false; continue; }
      w.krow[which][got] = p.k + off;
      w.vrow[which][got] = p.v + off;
      ++got;
    }
    return got;
  };
#ifdef LONGATTN_AVX2
  const bool widen = false;  // the micro-kernels widen fp16/bf16 in registers
#else
  const bool widen = p.dtype != kF32;  // widen into L1-resident fp32 rows first
#endif
  const int row_dtype = widen ? kF32 : p.dtype;
#ifdef LONGATTN_AVX2
  int pf = e0;  // entries [e0, pf) have been prefetched
  auto prefetch_to = [&](int upto) {
    for (upto = std::min(upto, e1); pf < upto; ++pf) {
      const int32_t pos = list[pf];
      const int64_t off = pos < 0 ? -1 : row_offset(p, b, pos, hk);
      if (off < 0) continue;
      for (int o = 0; o < D * es; o += 64) {
        _mm_prefetch(p.k + off + o, _MM_HINT_T0);
        _mm_prefetch(p.v + off + o, _MM_HINT_T0);
      }
    }
  };
  prefetch_to(e0 + kPrefetch);
#endif
  int cur = 0;
  int n = fill(cur);
  while (n > 0) {
    const int next_n = fill(cur ^ 1);
#ifdef LONGATTN_AVX2
    // Listed rows are scattered, so no hardware prefetcher follows them:
    // request the lines of the entries up to kPrefetch past the next chunk
    // now, so their DRAM latency overlaps the arithmetic of the chunks before.
    prefetch_to(e + kPrefetch);
#endif
    const void* const* krow = w.krow[cur];
    const void* const* vrow = w.vrow[cur];
    const void* kwide[kChunk];
    const void* vwide[kChunk];
    if (widen) {
      for (int j = 0; j < n; ++j) {
        load_row(krow[j], p.dtype, &w.kbuf[static_cast<size_t>(j) * D], D);
        load_row(vrow[j], p.dtype, &w.vbuf[static_cast<size_t>(j) * D], D);
        kwide[j] = &w.kbuf[static_cast<size_t>(j) * D];
        vwide[j] = &w.vbuf[static_cast<size_t>(j) * D];
      }
      krow = kwide;
      vrow = vwide;
    }
#ifdef LONGATTN_AVX512BF16
    if (row_dtype == kBF16)
      qk_block_bf16dot(w.q_bf16.data(), rows, D, krow, n, w.s.data(), kChunk, p.scale);
    else
#endif
      qk_block(w.q.data(), rows, D, row_dtype, krow, n, w.s.data(), kChunk);
    for (int r = 0; r < rows; ++r) {
      float* sr = &w.s[static_cast<size_t>(r) * kChunk];
      float chunk_max;
      if (p.softcap > 0.0f) {
        chunk_max = kNegInf;
        for (int j = 0; j < n; ++j) {
          sr[j] = p.softcap * std::tanh(sr[j] / p.softcap);
          chunk_max = std::max(chunk_max, sr[j]);
        }
      } else {
        chunk_max = row_max(sr, n);
      }
      fold_chunk(sr, n, chunk_max, &w.m[r], &w.l[r], &w.acc[static_cast<size_t>(r) * D], D);
    }
    pv_block(w.s.data(), rows, kChunk, row_dtype, vrow, n, w.acc.data(), D);
    cur ^= 1;
    n = next_n;
  }

  for (int r = 0; r < rows; ++r) {
    float* ar = &w.acc[static_cast<size_t>(r) * D];
    const float row_lse = normalise_row(ar, w.l[r], w.m[r], D);
    const int64_t h = static_cast<int64_t>(b) * p.nheads + h0 + r;
    if (whole) {
      store_row(ar, p.dtype, p.out + h * D * es, D);
      p.lse[h] = row_lse;
    } else {
      std::memcpy(p.partial_out + (slot * rows + r) * D, ar, sizeof(float) * D);
      p.partial_lse[slot * rows + r] = row_lse;
    }
  }
  return ok;
}

// Merge the num_splits partial slots of list `item` (= b * nlists + l), in split order.
void merge_list(const Gather& p, int64_t item, std::vector<float>& acc) {
  const int D = p.headdim, rows = p.nheads / p.nlists, S = p.num_splits;
  const int64_t b = item / p.nlists, l = item % p.nlists;
  acc.resize(D);
  for (int r = 0; r < rows; ++r) {
    auto slot_row = [&](int s) { return (item * S + s) * rows + r; };
    float top = kNegInf;
    for (int s = 0; s < S; ++s) top = std::max(top, p.partial_lse[slot_row(s)]);
    const float base = top == kNegInf ? 0.0f : top;
    float total = 0.0f;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int s = 0; s < S; ++s) {
      const float wgt = std::exp(p.partial_lse[slot_row(s)] - base);
      if (wgt == 0.0f) continue;
      total += wgt;
      const float* po = p.partial_out + slot_row(s) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[d] += wgt * po[d];
    }
    const bool seen = total != 0.0f;  // NaN too: a NaN partial makes the row NaN, not empty
    const float inv = seen ? 1.0f / total : 0.0f;
    for (int d = 0; d < D; ++d) acc[d] *= inv;
    const int64_t h = b * p.nheads + l * rows + r;
    store_row(acc.data(), p.dtype, p.out + h * D * elem_size(p.dtype), D);
    p.lse[h] = seen ? base + std::log(total) : kNegInf;
  }
}

}  // namespace

// Returns 0 on success, 1 for inconsistent sizes, 2 if a listed position (or
// its page) was out of range (that entry was not read; out/lse are then unusable).
extern "C" int longattn_gather_decode_cpu(
    const void* q, int64_t q_sb, int64_t q_sh,
    const void* k_cache, const void* v_cache, int64_t c_s0, int64_t c_s1, int64_t c_sh,
    int dtype, const int32_t* indices, int batch, int nlists, int n,
    const int32_t* block_table, int64_t bt_stride, int page_size, int num_pages, int64_t capacity,
    int nheads, int nheads_k, int headdim, float scale, float softcap,
    int split_len, int num_splits, float* partial_out, float* partial_lse,
    void* out, float* lse, int num_threads) {
  if (dtype < kF32 || dtype > kBF16 || headdim < 1 || nheads_k < 1 || nheads % nheads_k || nlists < 1 ||
      nheads % nlists || (nlists != nheads && nlists != nheads_k) || batch < 0 || n < 0 || split_len < 1 ||
      num_splits < 1 || static_cast<int64_t>(split_len) * num_splits < n ||
      (num_splits > 1 && (partial_out == nullptr || partial_lse == nullptr)) ||
      (block_table != nullptr && page_size < 1))
    return 1;
  Gather p{static_cast<const char*>(q), q_sb, q_sh,
           static_cast<const char*>(k_cache), static_cast<const char*>(v_cache), c_s0, c_s1, c_sh,
           dtype, indices, nlists, n, block_table, bt_stride, page_size, num_pages, capacity,
           nheads, nheads_k, headdim, scale, softcap, split_len, num_splits,
           partial_out, partial_lse, static_cast<char*>(out), lse};
  const int rows = nheads / nlists;
  const int64_t lists = static_cast<int64_t>(batch) * nlists, pieces = lists * num_splits;
  int status = 0;

  auto run = [&]() {
    thread_local Scratch scratch;  // kept between calls: a model calls this per layer per token
    scratch.resize(rows, headdim);
    bool ok = true;
    // Pieces differ in cost (-1 padding, short last split): hand them out
    // dynamically. Which thread runs a piece never changes what it computes.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < pieces; ++t) {
      const int64_t item = t / num_splits;
      const int s = static_cast<int>(t % num_splits);
      const int b = static_cast<int>(item / nlists), l = static_cast<int>(item % nlists);
      const int e0 = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(s) * split_len, n));
      const int e1 = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(s + 1) * split_len, n));
      ok = run_piece(p, scratch, b, l, e0, e1, num_splits == 1, t) && ok;
    }
    if (!ok) {
#pragma omp atomic write
      status = 2;
    }
    if (num_splits > 1) {
      thread_local std::vector<float> acc;
#pragma omp for schedule(static)
      for (int64_t item = 0; item < lists; ++item) merge_list(p, item, acc);
    }
  };
  if (num_threads <= 1) {
    run();  // on the caller's thread, no OpenMP region: a small call pays nothing for threads
  } else {
#pragma omp parallel num_threads(num_threads)
    run();
  }
  return status;
}
