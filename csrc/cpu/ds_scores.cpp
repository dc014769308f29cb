// Double Sparsity's approximate scores on the CPU, max over each query group.
//
// For sequence b, kv head h and position t < n:
//
//   out[b, h, t] = max over g < group of  sum_{j < r} q_sel[b, h, g, j] * label[b, h, j, t]
//
// with the sum taken in channel order j = 0, 1, ..., r - 1 as a chain of fused
// multiply-adds starting from 0 (one rounding per channel). Every build (AVX-512,
// AVX2, portable) does exactly that per position, so the scores are bitwise the
// same on every ISA path and for any thread count (positions never interact).
//
// The label cache is channel-major: label (batch, nheads_k, r, capacity) float32,
// so channel j of W consecutive positions is one vector load; a run of positions
// is read once per step (memory-bound: the r channel rows of a tile stay in L1
// while the group's queries reuse them).
//
// Layouts (float32, contiguous):
//   q_sel  (batch, nheads_k, group, r)
//   label  (batch, nheads_k, r, capacity), positions 0 .. n - 1 read (n <= capacity)
//   out    (batch, nheads_k, n)
// Work items: (b, h, tile of kTile positions), handed to threads statically.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "simd.h"

namespace {

constexpr int64_t kTile = 512;  // positions per work item: r * kTile * 4 bytes of labels (32 KB for r = 16)

struct Args {
  const float* q; const float* label; float* out;
  int batch, nheads_k, group, r;
  int64_t capacity, n;
};

// Positions t0 .. t1 - 1 of (b, h), one scalar at a time: the portable path,
// and nothing else (the vector paths mask their tails). std::fma keeps the
// rounding identical to the vector FMAs.
inline void tile_scalar(const float* q, const float* lab, int64_t cap, int group, int r, int64_t t0, int64_t t1,
                        float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    float best = -std::numeric_limits<float>::infinity();
    for (int g = 0; g < group; ++g) {
      float acc = 0.0f;
      for (int j = 0; j < r; ++j) acc = std::fma(q[g * r + j], lab[j * cap + t], acc);
      best = acc > best ? acc : best;  // the vector max's rule, max_ps(acc, best): a NaN acc is passed over, signed zeros alike
    }
    out[t] = best;
  }
}

#if defined(LONGATTN_AVX512)
constexpr int kW = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset1(float x) { return _mm512_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
struct Tail {
  __mmask16 m;
  explicit Tail(int count) : m(static_cast<__mmask16>((1u << count) - 1u)) {}
  vec load(const float* p) const { return _mm512_maskz_loadu_ps(m, p); }
  void store(float* p, vec v) const { _mm512_mask_storeu_ps(p, m, v); }
};
#elif defined(LONGATTN_AVX2)
constexpr int kW = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset1(float x) { return _mm256_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
struct Tail {
  __m256i m;
  explicit Tail(int count) {
    alignas(32) int32_t bits[8];
    for (int i = 0; i < 8; ++i) bits[i] = i < count ? -1 : 0;
    m = _mm256_load_si256(reinterpret_cast<const __m256i*>(bits));
  }
  vec load(const float* p) const { return _mm256_maskload_ps(p, m); }
  void store(float* p, vec v) const { _mm256_maskstore_ps(p, m, v); }
};
#endif

#if defined(LONGATTN_AVX2)
constexpr int kU = 4;  // vectors of positions per inner step: kU independent FMA chains per query

// Positions t0 .. t1 - 1 of (b, h). Lanes are positions; each lane runs the
// scalar path's exact FMA chain, so the result matches tile_scalar bitwise.
inline void tile_vector(const float* q, const float* lab, int64_t cap, int group, int r, int64_t t0, int64_t t1,
                        float* out) {
  const vec ninf = vset1(-std::numeric_limits<float>::infinity());
  int64_t t = t0;
  for (; t + kU * kW <= t1; t += kU * kW) {
    vec best[kU];
    for (int u = 0; u < kU; ++u) best[u] = ninf;
    for (int g = 0; g < group; ++g) {
      vec acc[kU];
      for (int u = 0; u < kU; ++u) acc[u] = vzero();
      for (int j = 0; j < r; ++j) {
        const vec qv = vset1(q[g * r + j]);
        const float* row = lab + j * cap + t;
        for (int u = 0; u < kU; ++u) acc[u] = vfma(qv, vload(row + u * kW), acc[u]);
      }
      // acc first: max_ps returns its second operand when either is NaN, so a
      // NaN product (NaN in q_sel or the label) is passed over, as the
      // PyTorch twin does (best never holds NaN).
      for (int u = 0; u < kU; ++u) best[u] = vmax(acc[u], best[u]);
    }
    for (int u = 0; u < kU; ++u) vstore(out + t + u * kW, best[u]);
  }
  for (; t < t1; t += kW) {  // the last < kU * kW positions, one (possibly masked) vector at a time
    const Tail tail(static_cast<int>(std::min<int64_t>(kW, t1 - t)));
    vec best = ninf;
    for (int g = 0; g < group; ++g) {
      vec acc = vzero();
      for (int j = 0; j < r; ++j) acc = vfma(vset1(q[g * r + j]), tail.load(lab + j * cap + t), acc);
      best = vmax(acc, best);  // acc first: a NaN product is passed over (above)
    }
    tail.store(out + t, best);
  }
}
#endif

void run_item(const Args& a, int64_t item, int64_t tiles) {
  const int64_t bh = item / tiles, tile = item % tiles;
  const float* q = a.q + bh * a.group * a.r;
  const float* lab = a.label + bh * a.r * a.capacity;
  float* out = a.out + bh * a.n;
  const int64_t t0 = tile * kTile, t1 = std::min(a.n, t0 + kTile);
#if defined(LONGATTN_AVX2)
  tile_vector(q, lab, a.capacity, a.group, a.r, t0, t1, out);
#else
  tile_scalar(q, lab, a.capacity, a.group, a.r, t0, t1, out);
#endif
}

}  // namespace

extern "C" {

// Returns 0, or 1 for arguments out of range (nothing written).
int longattn_ds_scores_cpu(const float* q_sel, const float* label, float* out, int batch, int nheads_k, int group,
                           int r, int64_t capacity, int64_t n, int num_threads) {
  if (batch < 0 || nheads_k < 0 || group < 1 || r < 1 || n < 0 || n > capacity) return 1;
  const Args a{q_sel, label, out, batch, nheads_k, group, r, capacity, n};
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t items = static_cast<int64_t>(batch) * nheads_k * tiles;
  if (num_threads <= 1 || items <= 1) {
    for (int64_t i = 0; i < items; ++i) run_item(a, i, tiles);
    return 0;
  }
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t i = 0; i < items; ++i) run_item(a, i, tiles);
  return 0;
}

}  // extern "C"
