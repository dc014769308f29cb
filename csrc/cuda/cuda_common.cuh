// Device helpers shared by longattn's CUDA kernels (decode_streamk.cu, gather_decode.cu):
// float32 conversions of the input dtypes, warp reductions, and the exp2-based
// online softmax both kernels run over blocks of 32 keys, one key per lane of
// a warp. Header-only, no host headers (NVRTC compiles it).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace longattn_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One row's score against the key of this lane: q_row (headdim floats) . the
// lane's K row in k_s (rows of headdim + 1 floats: the +1 staggers lanes
// across banks), scaled and soft-capped, in log2 units; -inf when the key does
// not count for the row (outside its window, not listed, a padding row).
__device__ __forceinline__ float lane_score(const float* q_row, const float* k_s, int lane, int headdim, float scale,
                                            float softcap, bool counted) {
  float sc = 0.f;
  for (int d = 0; d < headdim; ++d) sc += q_row[d] * k_s[lane * (headdim + 1) + d];
  sc *= scale;
  if (softcap > 0.f) sc = softcap * tanhf(sc / softcap);
  return counted ? sc * kLog2e : neg_inf();
}

// Folds a block of 32 keys (this lane's score sc, from lane_score) into one
// row's online softmax -- m its running max, l its running sum of exp2(score
// - m) -- and adds the block's P V to acc, this lane's output columns lane +
// 32 j, from v_s (32 x headdim floats, key-major).
template <int kDimsPerLane>
__device__ __forceinline__ void online_softmax_block(float sc, float& m, float& l, float (&acc)[kDimsPerLane],
                                                     const float* v_s, int headdim, int lane) {
  const float m_new = fmaxf(m, warp_max(sc));
  // Nothing counted yet: subtract 0 so exp2 gives exact zeros, not NaN.
  const float m_safe = m_new == neg_inf() ? 0.f : m_new;
  const float p = exp2f(sc - m_safe);
  const float alpha = exp2f(m - m_safe);
  l = l * alpha + warp_sum(p);
  m = m_new;
  #pragma unroll
  for (int j = 0; j < kDimsPerLane; ++j) acc[j] *= alpha;
  for (int jj = 0; jj < 32; ++jj) {  // key jj's probability, broadcast from lane jj
    const float pj = __shfl_sync(0xffffffffu, p, jj);
    #pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) {
      const int d = lane + 32 * j;
      if (d < headdim) acc[j] += pj * v_s[jj * headdim + d];
    }
  }
}

// A row's end: writes acc / l (this lane's columns; zeros when nothing
// counted) to o[0 .. headdim) in o's type and returns the row's lse (natural
// log; -inf when nothing counted).
template <typename T, int kDimsPerLane>
__device__ __forceinline__ float finish_row(T* o, float m, float l, const float (&acc)[kDimsPerLane], int headdim,
                                            int lane) {
  const bool empty = l == 0.f;
  const float inv = empty ? 0.f : 1.f / l;
  #pragma unroll
  for (int j = 0; j < kDimsPerLane; ++j) {
    const int d = lane + 32 * j;
    if (d < headdim) o[d] = from_float<T>(acc[j] * inv);
  }
  return empty ? neg_inf() : (m + log2f(l)) * kLn2;
}

}  // namespace longattn_cuda

using namespace longattn_cuda;
