// Gather decode attention: the CUDA twin.
//
// Follows longattn/kernels/gather/eager.py (the specification): each decode
// query attends exactly the cached token positions listed for it.
//
// Shapes (strides in elements):
//   q (batch, nheads, headdim), any strides;
//   contiguous cache k/v (batch, capacity, nheads_k, headdim): page_size = 0;
//   paged cache k/v (num_pages, page_size, nheads_k, headdim) + block_table
//   (batch, max_pages) int32: position p of sequence b is in page
//   block_table[b, p / page_size] at slot p % page_size;
//   indices (batch, nlists, n) int32, -1 = no token; a list serves
//   rows = nheads / nlists query heads: heads list*rows .. list*rows + rows - 1
//   of kv head list*rows / group (the whole group for per-kv-head lists, one
//   head for per-query-head lists);
//   out (batch, nheads, headdim) contiguous in the input dtype, lse (batch,
//   nheads) float32 contiguous, natural log. An empty list: out 0, lse -inf.
// Positions are assumed in range (the Python wrapper checks them on request).
//
// Two kernels, deterministic, no atomics:
//  1. gather_partial_*: grid (batch * nlists, num_splits * ceil(rows / kRows));
//     CTA (item, s * row_blocks + y) takes entries [s * split_len, min((s+1) * split_len, n))
//     of list item % nlists of sequence item / nlists, for rows
//     [y * kRows, (y+1) * kRows) of the list. Entries come in blocks of 32
//     (one per lane for the scores); their K/V rows are staged in shared memory
//     as float32 (-1 entries as zeros, masked). Online softmax in float32; one
//     split writes out/lse, otherwise the normalised partial goes to float32
//     workspace row (item * num_splits + s) * rows + r.
//  2. gather_merge_*: grid (batch * nlists, ceil(headdim / kMergeCols)), only
//     when split: merges a list's partials in split order: M = max L_i (0 if
//     all -inf), w_i = exp(L_i - M), O = sum w_i O_i / sum w_i,
//     L = M + log(sum w_i); empty -> 0 / -inf.
// Inside a CTA: 4 warps, each owns kRows / 4 rows; each lane accumulates
// headdim / 32 output dims of each of its rows.
// Compiles with nvcc and with NVRTC (no host headers: loaded by cupy.RawModule).

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "cuda_common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;                      // list rows per CTA (blockIdx.y picks the block)
constexpr int kRowsPerWarp = kRows / kWarps;
constexpr int kBlockN = 32;                    // listed entries per step: one per lane
static_assert(kBlockN == 32, "one key per lane of a warp: online_softmax_block folds 32");
constexpr int kMaxDim = 256;
constexpr int kDimsPerLane = kMaxDim / 32;
constexpr int kMergeCols = 32;                 // headdim columns per merge CTA

// Dynamic shared memory for headdim D (bytes; gather_smem_bytes in gather/cuda.py):
// 2 * kBlockN int64 row offsets (-1: no token), then q (kRows x D), K (kBlockN x (D+1):
// the +1 staggers lanes reading different rows across banks), V (kBlockN x D), float32.
template <typename T>
__device__ void gather_partial(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ indices,
    const int* __restrict__ block_table, T* __restrict__ out, float* __restrict__ lse,
    float* __restrict__ ws_o, float* __restrict__ ws_l,
    long long sq_b, long long sq_h, long long sq_d,
    long long sk_0, long long sk_1, long long sk_h, long long sk_d,
    long long sv_0, long long sv_1, long long sv_h, long long sv_d,
    long long si_b, long long si_l, long long si_n, long long bt_b, long long bt_p,
    int nlists, int n, int rows, int group, int nheads, int headdim, int page_size, int split_len,
    int num_splits, float scale, float softcap) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  long long* k_off = reinterpret_cast<long long*>(smem_raw);
  long long* v_off = k_off + kBlockN;
  float* q_s = reinterpret_cast<float*>(v_off + kBlockN);
  float* k_s = q_s + kRows * headdim;
  float* v_s = k_s + kBlockN * (headdim + 1);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // blockIdx.y = split * row_blocks + row block (a 2D grid: y folds both).
  const int row_blocks = (rows + kRows - 1) / kRows;
  const int item = blockIdx.x, split = blockIdx.y / row_blocks, row0 = (blockIdx.y % row_blocks) * kRows;
  const int b = item / nlists, list = item % nlists;
  const int h0 = list * rows, hk = h0 / group;
  const int start = split * split_len;
  const int end = static_cast<int>(min(static_cast<long long>(start) + split_len, static_cast<long long>(n)));
  const int* list_idx = indices + b * si_b + list * si_l;

  for (int idx = tid; idx < kRows * headdim; idx += kThreads) {
    const int r = row0 + idx / headdim, d = idx % headdim;
    q_s[idx] = r < rows ? to_float(q[b * sq_b + static_cast<long long>(h0 + r) * sq_h + d * sq_d]) : 0.f;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDimsPerLane];
  #pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = neg_inf();  // running max, log2 units
    l[rr] = 0.f;        // running sum of exp2(score - m)
    #pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) acc[rr][j] = 0.f;
  }

  for (int e0 = start; e0 < end; e0 += kBlockN) {  // CTA-uniform bounds: __syncthreads below is safe
    __syncthreads();  // everyone is done with the previous block (and q_s is written)
    if (tid < kBlockN) {
      const int e = e0 + tid;
      const long long pos = e < end ? list_idx[e * si_n] : -1;
      long long ko = -1, vo = -1;
      if (pos >= 0) {
        if (page_size > 0) {  // paged: one page lookup per entry, any page_size
          const long long page = block_table[b * bt_b + (pos / page_size) * bt_p];
          const long long off = pos % page_size;
          ko = page * sk_0 + off * sk_1 + hk * sk_h;
          vo = page * sv_0 + off * sv_1 + hk * sv_h;
        } else {
          ko = b * sk_0 + pos * sk_1 + hk * sk_h;
          vo = b * sv_0 + pos * sv_1 + hk * sv_h;
        }
      }
      k_off[tid] = ko;
      v_off[tid] = vo;
    }
    __syncthreads();
    for (int idx = tid; idx < kBlockN * headdim; idx += kThreads) {
      const int kj = idx / headdim, d = idx % headdim;
      const bool ok = k_off[kj] >= 0;  // -1 entries are never read
      k_s[kj * (headdim + 1) + d] = ok ? to_float(k[k_off[kj] + d * sk_d]) : 0.f;
      v_s[kj * headdim + d] = ok ? to_float(v[v_off[kj] + d * sv_d]) : 0.f;
    }
    __syncthreads();

    const bool listed = k_off[lane] >= 0;
    #pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int lr = warp * kRowsPerWarp + rr;  // row within the CTA's block
      const int r = row0 + lr;
      const float sc = lane_score(q_s + lr * headdim, k_s, lane, headdim, scale, softcap, r < rows && listed);
      online_softmax_block(sc, m[rr], l[rr], acc[rr], v_s, headdim, lane);
    }
  }

  #pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = row0 + warp * kRowsPerWarp + rr;
    if (r >= rows) continue;
    const long long h = static_cast<long long>(b) * nheads + h0 + r;
    if (num_splits == 1) {  // the whole list: final output
      const float row_lse = finish_row(out + h * headdim, m[rr], l[rr], acc[rr], headdim, lane);
      if (lane == 0) lse[h] = row_lse;
    } else {  // one split of several: float32 partial, merged by gather_merge
      const long long base = (static_cast<long long>(item) * num_splits + split) * rows + r;
      const float row_lse = finish_row(ws_o + base * headdim, m[rr], l[rr], acc[rr], headdim, lane);
      if (lane == 0) ws_l[base] = row_lse;
    }
  }
}

template <typename T>
__device__ void gather_merge(
    T* __restrict__ out, float* __restrict__ lse, const float* __restrict__ ws_o, const float* __restrict__ ws_l,
    int nlists, int rows, int nheads, int headdim, int num_splits) {
  const int item = blockIdx.x;
  const int b = item / nlists, h0 = (item % nlists) * rows;
  const int col0 = blockIdx.y * kMergeCols;           // this CTA's column slice of headdim
  const int ncols = min(kMergeCols, headdim - col0);  // >= 1: the grid has ceil(headdim / kMergeCols) slices
  // One thread per (row, column of the slice); each recomputes its row's max and
  // weights (every column CTA gets the same values in the same order).
  for (int idx = threadIdx.x; idx < rows * ncols; idx += blockDim.x) {
    const int r = idx / ncols, d = col0 + idx % ncols;
    float mx = neg_inf();
    for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, ws_l[(static_cast<long long>(item) * num_splits + s) * rows + r]);
    if (mx == neg_inf()) mx = 0.f;  // every part empty: weights are exact zeros
    float den = 0.f, num = 0.f;
    for (int s = 0; s < num_splits; ++s) {  // split order: deterministic
      const long long base = (static_cast<long long>(item) * num_splits + s) * rows + r;
      const float w = expf(ws_l[base] - mx);
      den += w;
      num += w * ws_o[base * headdim + d];
    }
    const long long h = static_cast<long long>(b) * nheads + h0 + r;
    out[h * headdim + d] = from_float<T>(den == 0.f ? 0.f : num / den);
    if (d == 0) lse[h] = den == 0.f ? neg_inf() : mx + logf(den);  // column 0 writes the shared lse
  }
}

}  // namespace

// extern "C" entry points (unmangled names for cupy.RawModule.get_function), one per dtype.
#define LONGATTN_GATHER_PARAMS(T)                                                                      \
  const T *q, const T *k, const T *v, const int *indices, const int *block_table, T *out, float *lse,  \
      float *ws_o, float *ws_l, long long sq_b, long long sq_h, long long sq_d, long long sk_0,         \
      long long sk_1, long long sk_h, long long sk_d, long long sv_0, long long sv_1, long long sv_h,  \
      long long sv_d, long long si_b, long long si_l, long long si_n, long long bt_b, long long bt_p,  \
      int nlists, int n, int rows, int group, int nheads, int headdim, int page_size, int split_len,   \
      int num_splits, float scale, float softcap
#define LONGATTN_GATHER_ARGS                                                                           \
  q, k, v, indices, block_table, out, lse, ws_o, ws_l, sq_b, sq_h, sq_d, sk_0, sk_1, sk_h, sk_d, sv_0, \
      sv_1, sv_h, sv_d, si_b, si_l, si_n, bt_b, bt_p, nlists, n, rows, group, nheads, headdim,         \
      page_size, split_len, num_splits, scale, softcap
#define LONGATTN_GATHER_MERGE_PARAMS(T)                                                                \
  T *out, float *lse, const float *ws_o, const float *ws_l, int nlists, int rows, int nheads,          \
      int headdim, int num_splits
#define LONGATTN_GATHER_MERGE_ARGS out, lse, ws_o, ws_l, nlists, rows, nheads, headdim, num_splits

#define LONGATTN_DEFINE(SUFFIX, T)                                                                     \
  extern "C" __global__ void __launch_bounds__(kThreads) gather_partial_##SUFFIX(LONGATTN_GATHER_PARAMS(T)) { \
    gather_partial<T>(LONGATTN_GATHER_ARGS);                                                           \
  }                                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads) gather_merge_##SUFFIX(LONGATTN_GATHER_MERGE_PARAMS(T)) { \
    gather_merge<T>(LONGATTN_GATHER_MERGE_ARGS);                                                       \
  }

LONGATTN_DEFINE(f32, float)
LONGATTN_DEFINE(f16, __half)
LONGATTN_DEFINE(bf16, __nv_bfloat16)
