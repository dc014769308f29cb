// Stream-K (LeanAttention) decode attention: the CUDA twin.
//
// Follows longattn/kernels/decode_eager.py::decode_forward_streamk_eager (the
// specification) and the schedule of longattn/decode/plan.py.
//
// Shapes (flash-attn's flash_attn_with_kvcache layout; strides in elements):
//   q (batch, seqlen_q, nheads, headdim), any strides;
//   contiguous cache k/v (batch, max_seqlen, nheads_k, headdim): page_size = 0;
//   paged cache k/v (num_pages, page_size, nheads_k, headdim) + block_table
//   (batch, max_pages) int32: key p of sequence b is in page
//   block_table[b, p / page_size] at slot p % page_size (any page_size >= 1);
//   seqlens (batch,) int32 keys attended;
//   out (batch, seqlen_q, nheads, headdim) contiguous, in the input dtype;
//   lse (batch, nheads, seqlen_q) float32 contiguous, natural log.
// Alignment is bottom-right per sequence: query i of sequence b sits at key
// position seqlens[b] - seqlen_q + i; window (left, right), -1 = unbounded,
// causal folded in as right = 0. Rows that see no key: out 0, lse -inf. The
// caller initialises out/lse to 0/-inf: tiles with no keys are never visited.
//
// Plan tensors (int32, from DecodePlan.as_tensors): segments (S, 6) rows
// (worker, tile, first, last, whole_tile, partial_slot); worker_first_segment
// (G + 1,); tile_first_partial (T + 1,); merge_tiles: tiles with partials.
//
// Two kernels, deterministic, no atomics, no spinning:
//  1. streamk_partial_*: grid (G, ceil(group * seqlen_q / kRows)); CTA c walks
//     worker c's segments. A segment is keys [first*block_n, min(last*block_n,
//     seqlen)) of output tile t: batch t / tiles_per_seq and kv heads from
//     (t % tiles_per_seq) * heads_per_tile (heads_per_tile is 1 in GPU plans;
//     CPU plans fold every kv head into a tile, run here one after another).
//     Each kv head's query group is folded into rows r = i * group + g (query
//     i, head kv_head*group+g) so K/V are read once for the whole group. Online
//     softmax in float32; a whole tile writes out/lse, otherwise the normalised
//     partial (out, lse) goes to float32 workspace rows (slot, kv head, row).
//  2. streamk_merge_*: grid (len(merge_tiles), ceil(headdim / kMergeCols));
//     merges the tile's slots in plan order: M = max L_i (0 if all -inf),
//     w_i = exp(L_i - M), O = sum w_i O_i / sum w_i, L = M + log(sum w_i);
//     empty -> 0 / -inf. CTA (t, c) takes headdim columns [c * kMergeCols,
//     (c + 1) * kMergeCols) of every row of tile t (all its kv heads): a GQA
//     decode tile has few rows and up to G partials, so one CTA per tile would
//     read every partial alone. Each CTA reads all partial lse of its rows (a
//     few bytes each) and recomputes the identical merged lse, and only its own
//     column slice of the partial outputs; column block 0 writes lse. The
//     per-element arithmetic and order do not depend on the split.
// (One launch would need "last contributor merges" via an atomic counter; the
// second launch gives the same fixed order with no counters to reset.)
//
// Inside a CTA: 4 warps; each warp owns kRows / 4 query rows; keys come in
// blocks of 32 (one key per lane for the scores), staged in shared memory as
// float32; each lane accumulates headdim / 32 output dims of each of its rows.
// Compiles with nvcc and with NVRTC (no host headers: loaded by cupy.RawModule).

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "cuda_common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;                      // query rows per CTA (blockIdx.y picks the block)
constexpr int kRowsPerWarp = kRows / kWarps;
constexpr int kBlockN = 32;                    // keys per step: one per lane
static_assert(kBlockN == 32, "one key per lane of a warp: online_softmax_block folds 32");
constexpr int kMaxDim = 256;
constexpr int kDimsPerLane = kMaxDim / 32;
constexpr int kMergeCols = 32;                 // headdim columns per merge CTA (blockIdx.y picks the slice)

// Dynamic shared memory layout for headdim D (bytes; see streamk_smem_bytes in decode_cuda.py):
// 2 * kBlockN int64 key offsets, then q (kRows x D), K (kBlockN x (D+1): the +1 staggers
// lanes reading different keys across banks), V (kBlockN x D), all float32.
template <typename T>
__device__ void streamk_partial(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    T* __restrict__ out, float* __restrict__ lse, float* __restrict__ ws_o, float* __restrict__ ws_l,
    const int* __restrict__ segs, const int* __restrict__ worker_first,
    const int* __restrict__ seqlens, const int* __restrict__ block_table,
    long long sq_b, long long sq_m, long long sq_h, long long sq_d,
    long long sk_0, long long sk_1, long long sk_h, long long sk_d,
    long long sv_0, long long sv_1, long long sv_h, long long sv_d,
    long long bt_b, long long bt_p,
    int nheads, int tiles_per_seq, int heads_per_tile, int seqlen_q, int group, int headdim, int block_n,
    int page_size, float scale, float softcap, int window_left, int window_right) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  long long* k_off = reinterpret_cast<long long*>(smem_raw);
  long long* v_off = k_off + kBlockN;
  float* q_s = reinterpret_cast<float*>(v_off + kBlockN);
  float* k_s = q_s + kRows * headdim;
  float* v_s = k_s + kBlockN * (headdim + 1);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_rows = group * seqlen_q;
  const int row0 = blockIdx.y * kRows;
  const int seg_lo = worker_first[blockIdx.x], seg_hi = worker_first[blockIdx.x + 1];

  for (int s = seg_lo; s < seg_hi; ++s) {  // CTA-uniform bounds: __syncthreads below is safe
    const int* seg = segs + 6LL * s;
    const int tile = seg[1], first = seg[2], last = seg[3], whole = seg[4], slot = seg[5];
    const int b = tile / tiles_per_seq;
    const int seqlen = seqlens[b];
    const int start = first * block_n;
    // Positions in 64 bits where a sum can pass INT_MAX: last * block_n near 2**31 keys,
    // seqlen + window_right for a huge window (INT_MAX as "everything").
    const int end = static_cast<int>(min(static_cast<long long>(last) * block_n, static_cast<long long>(seqlen)));
    // Skip keys no row of the tile can see (rows sit at seqlen - seqlen_q .. seqlen - 1).
    const int lo = window_left >= 0
        ? static_cast<int>(max(static_cast<long long>(start), static_cast<long long>(seqlen) - seqlen_q - window_left))
        : start;
    const int hi = window_right >= 0
        ? static_cast<int>(min(static_cast<long long>(end), static_cast<long long>(seqlen) + window_right))
        : end;

    // A tile holds heads_per_tile kv heads (1 in GPU plans; CPU plans fold them all in):
    // one pass over the segment's keys per kv head.
    for (int th = 0; th < heads_per_tile; ++th) {
      const int hk = (tile % tiles_per_seq) * heads_per_tile + th;
      __syncthreads();  // the previous segment's warps are done with q_s
      for (int idx = tid; idx < kRows * headdim; idx += kThreads) {
        const int r = row0 + idx / headdim, d = idx % headdim;
        float x = 0.f;
        if (r < n_rows) {
          const int i = r / group, h = hk * group + r % group;
          x = to_float(q[b * sq_b + i * sq_m + h * sq_h + d * sq_d]);
        }
        q_s[idx] = x;
      }

      float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDimsPerLane];
      #pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        m[rr] = neg_inf();  // running max, log2 units
        l[rr] = 0.f;        // running sum of exp2(score - m)
        #pragma unroll
        for (int j = 0; j < kDimsPerLane; ++j) acc[rr][j] = 0.f;
      }

      for (int n0 = lo; n0 < hi; n0 += kBlockN) {
        __syncthreads();  // everyone is done with the previous K/V block
        if (tid < kBlockN) {
          const int key = n0 + tid;
          long long ko = 0, vo = 0;
          if (key < hi) {
            if (page_size > 0) {  // paged: one page lookup per key, any page_size
              const long long page = block_table[b * bt_b + (key / page_size) * bt_p];
              const int off = key % page_size;
              ko = page * sk_0 + off * sk_1;
              vo = page * sv_0 + off * sv_1;
            } else {
              ko = b * sk_0 + key * sk_1;
              vo = b * sv_0 + key * sv_1;
            }
          }
          k_off[tid] = ko + hk * sk_h;
          v_off[tid] = vo + hk * sv_h;
        }
        __syncthreads();
        for (int idx = tid; idx < kBlockN * headdim; idx += kThreads) {
          const int kj = idx / headdim, d = idx % headdim;
          const bool ok = n0 + kj < hi;  // never read past the segment: pages there may be garbage
          k_s[kj * (headdim + 1) + d] = ok ? to_float(k[k_off[kj] + d * sk_d]) : 0.f;
          v_s[kj * headdim + d] = ok ? to_float(v[v_off[kj] + d * sv_d]) : 0.f;
        }
        __syncthreads();

        const int key = n0 + lane;
        #pragma unroll
        for (int rr = 0; rr < kRowsPerWarp; ++rr) {
          const int lr = warp * kRowsPerWarp + rr;  // row within the CTA's block
          const int r = row0 + lr;
          const int qpos = seqlen - seqlen_q + r / group;
          const bool visible = r < n_rows && key < hi &&
                               (window_left < 0 || key >= static_cast<long long>(qpos) - window_left) &&
                               (window_right < 0 || key <= static_cast<long long>(qpos) + window_right);
          const float sc = lane_score(q_s + lr * headdim, k_s, lane, headdim, scale, softcap, visible);
          online_softmax_block(sc, m[rr], l[rr], acc[rr], v_s, headdim, lane);
        }
      }

      #pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = row0 + warp * kRowsPerWarp + rr;
        if (r >= n_rows) continue;
        const int i = r / group, h = hk * group + r % group;
        if (whole) {  // the only contributor: final output
          T* o = out + ((static_cast<long long>(b) * seqlen_q + i) * nheads + h) * headdim;
          const float row_lse = finish_row(o, m[rr], l[rr], acc[rr], headdim, lane);
          if (lane == 0) lse[(static_cast<long long>(b) * nheads + h) * seqlen_q + i] = row_lse;
        } else {  // one of several: float32 partial, merged by streamk_merge
          const long long base = (static_cast<long long>(slot) * heads_per_tile + th) * n_rows + r;
          const float row_lse = finish_row(ws_o + base * headdim, m[rr], l[rr], acc[rr], headdim, lane);
          if (lane == 0) ws_l[base] = row_lse;
        }
      }
    }  // kv heads of the tile
  }
}

template <typename T>
__device__ void streamk_merge(
    T* __restrict__ out, float* __restrict__ lse, const float* __restrict__ ws_o, const float* __restrict__ ws_l,
    const int* __restrict__ merge_tiles, const int* __restrict__ tile_first,
    int nheads, int tiles_per_seq, int heads_per_tile, int seqlen_q, int group, int headdim) {
  const int tile = merge_tiles[blockIdx.x];
  const int b = tile / tiles_per_seq;
  const int lo = tile_first[tile], hi = tile_first[tile + 1];
  const int n_rows = group * seqlen_q;
  const int col0 = blockIdx.y * kMergeCols;              // this CTA's column slice of headdim
  const int ncols = min(kMergeCols, headdim - col0);     // >= 1: the grid has ceil(headdim / kMergeCols) slices
  // One thread per (kv head of the tile, row, column of the slice); each recomputes its row's
  // max and weights (a few cached loads; every column CTA gets the same values in the same
  // order). Workspace rows are (slot, kv head of the tile, row).
  for (int idx = threadIdx.x; idx < heads_per_tile * n_rows * ncols; idx += blockDim.x) {
    const int j = idx / (n_rows * ncols), r = idx / ncols % n_rows, d = col0 + idx % ncols;
    const int hk = (tile % tiles_per_seq) * heads_per_tile + j;
    float mx = neg_inf();
    for (int s = lo; s < hi; ++s) mx = fmaxf(mx, ws_l[(static_cast<long long>(s) * heads_per_tile + j) * n_rows + r]);
    if (mx == neg_inf()) mx = 0.f;  // every part empty: weights are exact zeros
    float den = 0.f, num = 0.f;
    for (int s = lo; s < hi; ++s) {  // slot order = plan order: deterministic
      const long long base = (static_cast<long long>(s) * heads_per_tile + j) * n_rows + r;
      const float w = expf(ws_l[base] - mx);
      den += w;
      num += w * ws_o[base * headdim + d];
    }
    const int i = r / group, h = hk * group + r % group;
    out[((static_cast<long long>(b) * seqlen_q + i) * nheads + h) * headdim + d] =
        from_float<T>(den == 0.f ? 0.f : num / den);
    // Identical in every column CTA; column 0 (in column block 0) writes it.
    if (d == 0) lse[(static_cast<long long>(b) * nheads + h) * seqlen_q + i] = den == 0.f ? neg_inf() : mx + logf(den);
  }
}

}  // namespace

// extern "C" entry points (unmangled names for cupy.RawModule.get_function), one per dtype.
#define LONGATTN_PARTIAL_PARAMS(T)                                                                     \
  const T *q, const T *k, const T *v, T *out, float *lse, float *ws_o, float *ws_l, const int *segs,   \
      const int *worker_first, const int *seqlens, const int *block_table, long long sq_b,             \
      long long sq_m, long long sq_h, long long sq_d, long long sk_0, long long sk_1, long long sk_h,  \
      long long sk_d, long long sv_0, long long sv_1, long long sv_h, long long sv_d, long long bt_b,  \
      long long bt_p, int nheads, int tiles_per_seq, int heads_per_tile, int seqlen_q, int group,      \
      int headdim, int block_n, int page_size, float scale, float softcap, int window_left,            \
      int window_right
#define LONGATTN_PARTIAL_ARGS                                                                          \
  q, k, v, out, lse, ws_o, ws_l, segs, worker_first, seqlens, block_table, sq_b, sq_m, sq_h, sq_d,     \
      sk_0, sk_1, sk_h, sk_d, sv_0, sv_1, sv_h, sv_d, bt_b, bt_p, nheads, tiles_per_seq,               \
      heads_per_tile, seqlen_q, group, headdim, block_n, page_size, scale, softcap, window_left,       \
      window_right
#define LONGATTN_MERGE_PARAMS(T)                                                                       \
  T *out, float *lse, const float *ws_o, const float *ws_l, const int *merge_tiles,                    \
      const int *tile_first, int nheads, int tiles_per_seq, int heads_per_tile, int seqlen_q,          \
      int group, int headdim
#define LONGATTN_MERGE_ARGS                                                                            \
  out, lse, ws_o, ws_l, merge_tiles, tile_first, nheads, tiles_per_seq, heads_per_tile, seqlen_q,      \
      group, headdim

#define LONGATTN_DEFINE(SUFFIX, T)                                                                     \
  extern "C" __global__ void __launch_bounds__(kThreads) streamk_partial_##SUFFIX(LONGATTN_PARTIAL_PARAMS(T)) { \
    streamk_partial<T>(LONGATTN_PARTIAL_ARGS);                                                         \
  }                                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads) streamk_merge_##SUFFIX(LONGATTN_MERGE_PARAMS(T)) { \
    streamk_merge<T>(LONGATTN_MERGE_ARGS);                                                             \
  }

LONGATTN_DEFINE(f32, float)
LONGATTN_DEFINE(f16, __half)
LONGATTN_DEFINE(bf16, __nv_bfloat16)
