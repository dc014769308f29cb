// The flash kernel's tile walk, shared by its math engines (header-only).
//
// A block of rows is (sequence, head, BM query rows; with listed keys, a
// piece of at most BM rows of one listing block of block_q); a work item is
// up to kGroup consecutive blocks of one head, walked together (work_item).
// BlockWalk decides which keys a block's rows may see -- the window span
// [lo, hi) (causal: up to the last row), the sinks left and right of it, and
// listed keys outside both -- cuts them into tiles of at most BN keys, and
// says per tile whether every row sees every key (no mask needed). What happens to a
// tile is the engine's: it scores the keys, folds them into the online
// softmax and accumulates P V, in its own arithmetic (flash_cpu.cpp: float32
// FMAs, bf16 dot products; flash_amx.h: AMX tiles). So every engine sees the
// same keys in the same order and the visibility rule lives here once.
//
// Visibility: query row i sits at key position p = i + seqlen_k - seqlen_q
// and sees key j iff (not causal or j <= p) and
//   * j is in the window: (left < 0 or j >= p - left) and (right < 0 or j <= p + right)
//     (flash-attn's convention; dense attention passes causal folded into right = 0), or
//   * j < sink (a sink), or
//   * j is listed for the row's query block (block-sparse attention: the
//     caller passes, per (batch, head, block of block_q rows), key positions or -1).
//
// An engine provides
//   Engine(int headdim, SharedTile* shared);           // scratch of one block; what a thread's engines share
//   void begin(const Problem&, const Seq&, int h, int first_row, int rows);
//   void tile(const Problem&, const Seq&, int kv_head, const int64_t* keys, const uint8_t* listed,
//             int n, int rows, int64_t p0, bool needs_mask);
//   void finish(const Problem&, const Seq&, int h, int first_row, int rows);
// keys[0..n) are the tile's key positions (n <= BN); listed (or null) flags
// listed keys; rows at positions p0 .. p0 + rows - 1.

#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "simd.h"

#ifdef LONGATTN_AVX2
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int W = Isa::W;
// Query vectors per work item: 48 rows with either width, so each K/V tile
// read from memory serves 48 query rows (AVX2 items of 24 rows ran 30% below
// their 8k speed at 32k, where K and V outgrow the caches; 48 rows: see
// score_tile, which scores them NQ_STEP vectors at a time).
constexpr int NQ = W == 16 ? 3 : 6;
constexpr int NQ_STEP = 3;   // row vectors per score micro-step (KR x NQ_STEP accumulators)
constexpr int BM = NQ * W;   // query rows per work item: 48
// Micro-tile sizes fit the register file: AVX-512 has 32 vector registers
// (scores: KR x NQ_STEP = 24 accumulators + 3 query vectors; P V: R x NV = 24 +
// NV value vectors), AVX2 has 16, where the AVX-512 sizes spilled
// accumulators to the stack on every step: KR = 4 (12 + 3 + the broadcast)
// and NV = 2 (12 + 2 + the broadcast) there ran 1.2x (fp32) and 1.3x (bf16
// inputs) faster at 4k causal (the AVX2 build on a Zen 4, A/B in one process).
constexpr int KR = W == 16 ? 8 : 4;  // keys per score micro-step (KR x NQ_STEP accumulators)
constexpr int R = 6;                 // rows per P V micro-step (R x NV accumulators); divides BM
constexpr int NV = W == 16 ? 4 : 2;  // headdim vectors per P V micro-step
constexpr int BN = 64;       // keys per tile (a multiple of KR)

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
// the varlen layout. Pointers are at its row 0 (head 0), q/k/v in the
// engine's input type (float, or bf16 bits as uint16_t); strides are the Problem's.
struct Seq {
  const void *q, *k, *v;
  float* out;
  float* lse;      // lse of (head 0, row 0)
  int64_t lse_sh;  // lse head stride
  const int32_t* listed;  // (nheads, query blocks, listed_per_block) key positions, -1 = none; or null
  int seqlen_q, seqlen_k;
};

// A tile's key positions and the listed-key bookkeeping; one per thread.
struct KeyLists {
  std::vector<uint8_t> in_list;      // listed flags over the window span
  std::vector<int64_t> keys, extra;  // a tile's key positions; listed keys outside the span
  KeyLists() : keys(BN) {}
};

// The rows r (at positions p0 + r) that see key j form one interval [lo, hi]
// (the window's edges and causality each bound r from one side; a sink or a
// listed key drops the window's bounds), clamped to [-1, BM]: empty when lo > hi.
// This is the visibility rule of the header comment, solved for r.
inline void visible_rows(const Problem& pb, int64_t j, int64_t p0, bool listed, int* lo, int* hi) {
  const int64_t rel = j - p0;  // row r sees j only if (causal) r >= rel
  int64_t first = pb.causal ? rel : std::numeric_limits<int64_t>::min() / 2, last = BM - 1;
  if (!(j < pb.sink || listed)) {
    if (pb.right >= 0) first = std::max(first, rel - pb.right);  // j <= p + right
    if (pb.left >= 0) last = std::min(last, rel + pb.left);      // j >= p - left
  }
  *lo = static_cast<int>(std::clamp<int64_t>(first, -1, BM));
  *hi = static_cast<int>(std::clamp<int64_t>(last, -1, BM));
}

// Every row of the item sees every key of [j0, jl] (no mask needed).
inline bool whole_tile(const Problem& pb, int64_t j0, int64_t jl, int n, int rows, int64_t p0, int64_t p1) {
  if (n != BN || rows != BM || (pb.causal && jl > p0)) return false;
  const bool all_in_window = (pb.left < 0 || j0 >= p1 - pb.left) && (pb.right < 0 || jl <= p0 + pb.right);
  return all_in_window || jl < pb.sink;
}

// cap * tanh(x / cap), with tanh(y) = 1 - 2 / (exp(2y) + 1) (saturates to +-1, no overflow).
inline Isa::vec softcap_vec(Isa::vec x, float cap) {
  const Isa::vec e = Isa::exp(Isa::mul(x, Isa::set1(2.0f / cap)));
  const Isa::vec t = Isa::sub(Isa::set1(1.0f), Isa::div(Isa::set1(2.0f), Isa::add(e, Isa::set1(1.0f))));
  return Isa::mul(t, Isa::set1(cap));
}

// Key-major scores st[j * BM + r] (j < n_scored, a multiple of KR) of one
// tile -> probabilities, folding the tile into the running max m, sum l of
// each row; alpha[r] = exp(m_old - m_new) is what the row's accumulated
// output must be scaled by. Applies softcap, then the mask (keys j >= n and
// invisible ones become -inf) when needs_mask. Only the first nq row vectors
// (the item's rows, see active_vectors) are touched: the lanes past them
// hold probability 0 for the whole item (RowState::reset).
// score_scale: a factor the scores still need (> 0: the AMX engine folds the
// softmax scale in here instead of a pass of its own; with softcap the
// caller scales first), applied as they are read (1: exactly as before).
inline void online_softmax(const Problem& pb, float* st, const int64_t* keys, const uint8_t* listed, int n,
                           int n_scored, int64_t p0, bool needs_mask, float* m, float* l, float* alpha,
                           int nq = NQ, float score_scale = 1.0f) {
  if (pb.softcap > 0)
    for (int j = 0; j < n_scored; ++j)
      for (int c = 0; c < nq; ++c)
        Isa::store(st + j * BM + c * W, softcap_vec(Isa::load(st + j * BM + c * W), pb.softcap));
  if (needs_mask)
    for (int j = 0; j < n_scored; ++j) {
      int lo = BM, hi = -1;  // nothing visible (keys past n)
      if (j < n) visible_rows(pb, keys[j], p0, listed != nullptr && listed[j], &lo, &hi);
      if (lo <= 0 && hi >= BM - 1) continue;
      for (int c = 0; c < nq; ++c)
        Isa::store(st + j * BM + c * W, Isa::keep_lanes_between(Isa::load(st + j * BM + c * W), c * W, lo, hi));
    }
  for (int c = 0; c < nq; ++c) {
    Isa::vec tile_max = Isa::set1(kNegInf);
    for (int j = 0; j < n_scored; ++j) tile_max = Isa::max(tile_max, Isa::load(st + j * BM + c * W));
    const Isa::vec scale = Isa::set1(score_scale);
    const Isa::vec m_old = Isa::load(m + c * W);
    const Isa::vec m_new = Isa::max(m_old, Isa::mul(tile_max, scale));  // max commutes with a scale > 0
    const Isa::vec m_sub = Isa::finite_or_zero(m_new);
    const Isa::vec neg_m_sub = Isa::sub(Isa::zero(), m_sub);
    const Isa::vec a = Isa::exp(Isa::sub(m_old, m_sub));
    Isa::vec sum = Isa::zero();
    for (int j = 0; j < n_scored; ++j) {
      // fma(s, 1, -m) rounds as s - m did: the other engines' results are unchanged
      const Isa::vec p = Isa::exp(Isa::fma(Isa::load(st + j * BM + c * W), scale, neg_m_sub));
      Isa::store(st + j * BM + c * W, p);
      sum = Isa::add(sum, p);
    }
    Isa::store(m + c * W, m_new);
    Isa::store(l + c * W, Isa::fma(a, Isa::load(l + c * W), sum));
    Isa::store(alpha + c * W, a);
  }
}

// out rows = o / l, lse = m + log(l); rows that saw nothing (l = 0): 0 and -inf.
inline void write_rows(const Problem& pb, const Seq& sq, int h, int first_row, int rows, const float* o,
                       const float* m, const float* l) {
  const int headdim = pb.headdim;
  for (int r = 0; r < rows; ++r) {
    float* orow = sq.out + static_cast<int64_t>(first_row + r) * pb.o_ss + static_cast<int64_t>(h) * pb.o_sh;
    float* lse = sq.lse + static_cast<int64_t>(h) * sq.lse_sh + first_row + r;
    if (l[r] != 0.0f) {  // NaN too: a row that saw a NaN score is NaN, not empty
      const float inv = 1.0f / l[r];
      for (int d = 0; d < headdim; ++d) orow[d] = o[static_cast<size_t>(r) * headdim + d] * inv;
      *lse = m[r] + std::log(l[r]);
    } else {
      for (int d = 0; d < headdim; ++d) orow[d] = 0.0f;
      *lse = kNegInf;
    }
  }
}

// Row r's query (rows past the item's last repeat it: they are padding).
template <class T>
inline const T* query_row(const Problem& pb, const Seq& sq, int h, int first_row, int r, int rows) {
  return static_cast<const T*>(sq.q) + static_cast<int64_t>(first_row + std::min(r, rows - 1)) * pb.q_ss +
         static_cast<int64_t>(h) * pb.q_sh;
}

// Key or value rows of one kv head: base + kv_head * head_stride.
template <class T>
inline const T* head_rows(const void* base, int64_t head_stride, int kv_head) {
  return static_cast<const T*>(base) + static_cast<int64_t>(kv_head) * head_stride;
}

// Row vectors an item of `rows` rows needs (1..NQ). A short item (the 16-row
// piece a block_q = 64 listing leaves after a 48-row one, a sequence's last
// rows) scores and softmaxes only these: the piece of HiP's 64-row blocks
// then costs a third of a full item instead of a whole one.
inline int active_vectors(int rows) { return std::min(NQ, (rows + W - 1) / W); }

// The float32 state of an item's rows that engines with key-major scores
// share: the tile's scores st (BN x BM), the output accumulator o (BM x
// headdim), running max m, sum l and the last tile's rescale alpha; nq, the
// row vectors in use (active_vectors).
struct RowState {
  std::vector<float> st, o, m, l, alpha;
  int nq = NQ;
  explicit RowState(int headdim)
      : st(BN * BM), o(static_cast<size_t>(BM) * headdim), m(BM), l(BM), alpha(BM) {}
  // A new item of `rows` rows. P V runs rows in steps of R and may pass
  // nq * W into padding rows, which are never written; their lanes are kept
  // at probability 0 and alpha 0 for the whole item so that this arithmetic
  // runs on zeros, not on an earlier item's leftovers (denormal or not).
  void reset(int rows = BM) {
    const int previous = nq;
    nq = active_vectors(rows);
    std::fill(o.begin(), o.end(), 0.0f);
    std::fill(m.begin(), m.end(), kNegInf);
    std::fill(l.begin(), l.end(), 0.0f);
    std::fill(alpha.begin(), alpha.end(), 0.0f);
    if (nq < NQ && previous > nq)  // lanes the previous item scored: back to 0
      for (int j = 0; j < BN; ++j) std::fill(st.begin() + j * BM + nq * W, st.begin() + (j + 1) * BM, 0.0f);
  }
  void finish(const Problem& pb, const Seq& sq, int h, int first_row, int rows) {
    write_rows(pb, sq, h, first_row, rows, o.data(), m.data(), l.data());
  }
};

// The walk of one block of rows (first_row .. first_row + rows - 1 of query
// block query_block): the keys its rows may see -- the window span [lo, hi)
// (causal: up to the last row), the sinks [0, sink_end) left and right of
// it, and listed keys outside both -- handed to an engine one tile of at most
// BN keys at a time, in the same order whatever else runs beside it.
class BlockWalk {
 public:
  void start(const Problem& pb, const Seq& sq, int h, int query_block, int first_row, int rows) {
    rows_ = rows;
    kv_head_ = h / (pb.nheads / pb.nheads_k);
    const int64_t offset = static_cast<int64_t>(sq.seqlen_k) - sq.seqlen_q;
    p0_ = first_row + offset;
    p1_ = p0_ + rows - 1;
    const int64_t visible_end = pb.causal ? std::min<int64_t>(sq.seqlen_k, p1_ + 1) : sq.seqlen_k;
    const int64_t hi = std::max<int64_t>(0, pb.right < 0 ? visible_end : std::min(visible_end, p1_ + pb.right + 1));
    lo_ = std::min(hi, pb.left < 0 ? int64_t{0} : std::max<int64_t>(0, p0_ - pb.left));
    const int64_t sink_end = std::min<int64_t>(pb.sink, visible_end);
    const int64_t ranges[3][2] = {{0, std::min(sink_end, lo_)}, {lo_, hi}, {std::max(hi, lo_), sink_end}};
    std::copy(&ranges[0][0], &ranges[0][0] + 6, &ranges_[0][0]);
    const int32_t* listed = sq.listed == nullptr ? nullptr
        : sq.listed + (static_cast<int64_t>(h) * ((sq.seqlen_q + pb.block_q - 1) / pb.block_q) + query_block) *
                          pb.listed_per_block;
    listing_ = listed != nullptr;
    kl_.extra.clear();
    if (listing_) {
      kl_.in_list.assign(static_cast<size_t>(hi - lo_), 0);
      for (int t = 0; t < pb.listed_per_block; ++t) {
        const int64_t j = listed[t];
        if (j < 0 || j >= visible_end || j < sink_end) continue;  // none, never visible, or a sink anyway
        if (j >= lo_ && j < hi) kl_.in_list[j - lo_] = 1;
        else kl_.extra.push_back(j);
      }
    }
    range_ = 0;
    next_ = ranges_[0][0];
    settle();
  }

  bool done() const { return range_ > 3; }

  // Where the next tile starts: its first key position for the three ranges;
  // listed keys outside them come after every range tile (they are in listing order).
  int64_t next_key() const { return range_ < 3 ? next_ : std::numeric_limits<int64_t>::max(); }

  // Runs the next tile on the engine (as begun for this block).
  template <class Engine>
  void step(const Problem& pb, const Seq& sq, Engine& e) {
    int64_t* keys = kl_.keys.data();
    if (range_ < 3) {
      const int64_t j0 = next_;
      const int n = static_cast<int>(std::min<int64_t>(BN, ranges_[range_][1] - j0));
      for (int j = 0; j < n; ++j) keys[j] = j0 + j;
      const uint8_t* flags = (range_ == 1 && listing_) ? kl_.in_list.data() + (j0 - lo_) : nullptr;
      const bool whole = whole_tile(pb, j0, j0 + n - 1, n, rows_, p0_, p1_);
      e.tile(pb, sq, kv_head_, keys, flags, n, rows_, p0_, !whole);
      next_ = j0 + n;
    } else {
      static const std::array<uint8_t, BN> kAllListed = [] {
        std::array<uint8_t, BN> flags{};
        flags.fill(1);
        return flags;
      }();
      const int n = static_cast<int>(std::min<size_t>(BN, kl_.extra.size() - static_cast<size_t>(next_)));
      int64_t last = 0;
      for (int j = 0; j < n; ++j) last = std::max(last, keys[j] = kl_.extra[static_cast<size_t>(next_) + j]);
      // listed keys are seen by every row, up to causality
      const bool whole = n == BN && rows_ == BM && (!pb.causal || last <= p0_);
      e.tile(pb, sq, kv_head_, keys, kAllListed.data(), n, rows_, p0_, !whole);
      next_ += n;
    }
    settle();
  }

 private:
  // Moves past exhausted ranges (range_ 3: the listed keys outside them, next_ counting them; 4: done).
  void settle() {
    while (range_ < 3 && next_ >= ranges_[range_][1]) {
      ++range_;
      next_ = range_ < 3 ? ranges_[range_][0] : 0;
    }
    if (range_ == 3 && next_ >= static_cast<int64_t>(kl_.extra.size())) range_ = 4;
  }

  KeyLists kl_;
  int64_t ranges_[3][2] = {};
  int64_t lo_ = 0, p0_ = 0, p1_ = 0, next_ = 0;
  int range_ = 4, rows_ = 0, kv_head_ = 0;
  bool listing_ = false;
};

// One block of rows of a work item: (query block, first row, rows).
struct RowBlock {
  int query_block, first_row, rows;
};

// Most blocks of rows one work item walks together (kGroup x BM = 192 rows).
constexpr int kGroup = 4;

// A tile's values as an engine prepares them (the bf16 engines pair V rows),
// shared by a thread's engines: the blocks of a work item walk the same tiles
// one after another (work_item), so each tile is prepared once per item, by
// the first block that reaches it. Tagged with what it was made from (the V
// rows of one head and the tile's keys); a thread's engines live for one
// kernel call, during which V does not change.
struct SharedTile {
  std::vector<uint32_t> words;  // the prepared values (the engine's layout)
  // True when words hold the tile (base, keys[0..n)); else the caller prepares them and calls hold().
  bool holds(const void* base, const int64_t* tile_keys, int n) const {
    return base == base_ && n == n_ && std::equal(tile_keys, tile_keys + n, keys_.begin());
  }
  void hold(const void* base, const int64_t* tile_keys, int n) {
    base_ = base;
    n_ = n;
    std::copy(tile_keys, tile_keys + n, keys_.begin());
  }

 private:
  const void* base_ = nullptr;
  int n_ = -1;
  std::array<int64_t, BN> keys_{};
};

// A thread's engines and walks, one per block of a work item of `group`
// blocks, and what its engines share. An engine is made as Engine(headdim, &shared).
template <class Engine>
struct Crew {
  SharedTile shared;
  std::vector<std::unique_ptr<Engine>> engines;
  std::vector<BlockWalk> walks;
  Crew(int headdim, int group) : walks(group) {
    for (int g = 0; g < group; ++g) engines.push_back(std::make_unique<Engine>(headdim, &shared));
  }
};

// Keys per turn of a block in a work item (work_item): K and V of 512 keys
// (512 KiB in float32 at head dim 128) stay in L2 while the item's blocks
// take their turns, and a block's own state (queries, scores, output: ~60
// KiB) stays in L1 for a turn of 8 tiles.
constexpr int64_t kChunkKeys = 512;

// One work item: up to kGroup blocks of rows of one head of one sequence
// (blocks[0..count)), walked together. Each block sees its own keys in its own
// order (BlockWalk), so its results are bitwise what it would get alone. The
// walks take turns by chunks of kChunkKeys key positions (the block whose next
// tile starts in the lowest chunk walks its tiles in that chunk; ties to the
// first block), so K/V rows that several blocks see come from memory once and
// from L2 after: 192 rows share each trip through a long context's K and V
// instead of 48 (1.04-1.07x at 4k-8k causal on the Intel Xeon, fp32 and AMX;
// the bf16 engines also pair each tile's V rows once per item: SharedTile).
template <class Engine>
void work_item(const Problem& pb, Crew<Engine>& crew, const Seq& sq, int h, const RowBlock* blocks, int count) {
  for (int g = 0; g < count; ++g) {
    crew.engines[g]->begin(pb, sq, h, blocks[g].first_row, blocks[g].rows);
    crew.walks[g].start(pb, sq, h, blocks[g].query_block, blocks[g].first_row, blocks[g].rows);
  }
  for (;;) {
    int pick = -1;
    int64_t lowest = 0;
    for (int g = 0; g < count; ++g) {
      if (crew.walks[g].done()) continue;
      const int64_t key = crew.walks[g].next_key() / kChunkKeys;
      if (pick < 0 || key < lowest) {
        pick = g;
        lowest = key;
      }
    }
    if (pick < 0) break;
    BlockWalk& w = crew.walks[pick];
    do w.step(pb, sq, *crew.engines[pick]);
    while (!w.done() && w.next_key() / kChunkKeys == lowest);
  }
  for (int g = 0; g < count; ++g) crew.engines[g]->finish(pb, sq, h, blocks[g].first_row, blocks[g].rows);
}

// Blocks per work item for `units` blocks of rows in all on num_threads
// threads: kGroup, unless that leaves fewer than 8 items per thread (causal
// items differ in cost; dynamic scheduling needs many to even them out).
// Results do not depend on it (each block's walk is its own).
inline int group_size(int64_t units, int num_threads) {
  const int64_t per_thread = units / (8 * static_cast<int64_t>(num_threads));
  return static_cast<int>(std::clamp<int64_t>(per_thread, 1, kGroup));
}

// Runs items [0, items) of up to `group` blocks each on num_threads threads;
// item(it, crew) does one. Each item is computed by one thread in a fixed
// order: results do not depend on the thread count or the schedule.
template <class Engine, class Item>
void run_items(int64_t items, int group, int headdim, int num_threads, const Item& item) {
#pragma omp parallel num_threads(num_threads)
  {
    Crew<Engine> crew(headdim, group);
    // Items differ in cost (causal rows see more keys the later they sit): hand them out dynamically.
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) item(it, crew);
  }
}

}  // namespace
#endif  // LONGATTN_AVX2
