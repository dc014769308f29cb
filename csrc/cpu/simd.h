// Vector helpers shared by the CPU kernels of csrc/cpu (header-only).
//
// LONGATTN_AVX2 / LONGATTN_AVX512 / LONGATTN_AVX512BF16 say what the compiler
// may use (longattn/kernels/support/cpp_build.py builds for the highest level
// this CPU has: x86-64-v4 + avx512bf16, x86-64-v4, x86-64-v3 or portable).
// `Isa` is the widest float vector available: kernels written over Isa::vec
// run 16 lanes with AVX-512 and 8 with AVX2; without AVX2 the kernels take
// their scalar paths.

#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LONGATTN_AVX2 1
#if defined(__AVX512F__)
#define LONGATTN_AVX512 1
#if defined(__AVX512BF16__)
#define LONGATTN_AVX512BF16 1
#endif
#endif
#endif

#include <cstdint>

namespace {

// Software prefetch of the 64-byte line at p into L2 that the compiler must
// keep. gcc 12 drops _mm_prefetch / __builtin_prefetch together with the
// whole call when they sit in a function of their own that it then finds
// pure (modref: it only reads memory; a call to a pure void function does
// nothing): HiP's search ran without its prefetch that way. An asm
// statement marked volatile is never removed.
inline void prefetch_l2(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

#ifdef LONGATTN_AVX2
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// exp for x <= 88 (scores minus their max are <= 0); exactly 0 below -87.3
// and for -inf; NaN for NaN (the clamp puts x second: min/max return their
// second operand when either is NaN, so a NaN score stays NaN and reaches the
// output, as it does dense attention's, instead of being clamped to 0).
// Range reduction x = k ln2 + r, |r| <= ln2/2, then a degree-7 Taylor
// polynomial: relative error ~4e-9, below float rounding. One set of
// constants for every vector width below.
namespace exp_constants {
constexpr float kLow = -87.3f, kHigh = 88.3f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln2 split for an exact k * hi
constexpr float kPoly[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};  // Horner
}  // namespace exp_constants

inline __m256 exp256(__m256 x) {
  using namespace exp_constants;
  const __m256 lo = _mm256_set1_ps(kLow), hi = _mm256_set1_ps(kHigh);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kPoly[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kPoly[i]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

#ifdef LONGATTN_AVX512
// exp256, 16 lanes. 2^k is applied by VSCALEFPS (p * 2^k, exact) instead of
// building its bits and multiplying: 4 instructions fewer, the same bits for
// every float input (checked over a sweep of 2e9 inputs, with and without
// FTZ/DAZ).
inline __m512 exp512(__m512 x) {
  using namespace exp_constants;
  const __m512 lo = _mm512_set1_ps(kLow), hi = _mm512_set1_ps(kHigh);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(hi, _mm512_max_ps(lo, x));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kPoly[i]));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~underflow), p, k);
}
#endif

// The micro-kernels are written once over a vector of W floats: 16 with
// AVX-512 (twice the FMA work per instruction where the core has 512-bit
// units), else 8 with AVX2. Loads of K/V rows widen fp16/bf16 to fp32 in
// registers, so each element is read from memory once and never written back.
struct Avx2 {
  using vec = __m256;
  static constexpr int W = 8;
  static vec zero() { return _mm256_setzero_ps(); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static vec load(const uint16_t* p) {  // bfloat16: the top half of a float32
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static vec load(const _Float16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // 2W bfloat16 from p as two vectors: the even elements (lane l = p[2l])
  // and the odd ones (p[2l + 1]); one ALU op each, no lane-crossing shuffle.
  static vec load_bf16_even(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
  }
  static vec load_bf16_odd(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                                _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec set1(float x) { return _mm256_set1_ps(x); }
  static __m256 fold8(vec v) { return v; }  // 8 lanes with the same sum
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec div(vec a, vec b) { return _mm256_div_ps(a, b); }
  static vec exp(vec x) { return exp256(x); }
  // -inf lanes become 0 (a running max that saw nothing: x - m stays -inf, not NaN).
  static vec finite_or_zero(vec m) {
    return _mm256_blendv_ps(m, _mm256_setzero_ps(), _mm256_cmp_ps(m, _mm256_set1_ps(-__builtin_inff()), _CMP_EQ_OQ));
  }
  static float hsum(vec v) { return ::hsum(v); }
  // Whether any lane of x is above m.
  static bool any_greater(vec x, float m) { return _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(m), _CMP_GT_OQ)) != 0; }
  // Lanes [lo, hi) keep x, the rest become -inf; 0 <= lo, hi <= 8.
  static vec keep_lanes(vec x, int lo, int hi) { return keep_lanes_between(x, 0, lo, hi - 1); }
  static float hmax(vec v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  // Lanes whose position limit[lane] is below pos become -inf (causal masking).
  static vec drop_after(vec x, const int32_t* limit, int32_t pos) {
    const __m256i over = _mm256_cmpgt_epi32(_mm256_set1_epi32(pos), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(limit)));
    return _mm256_blendv_ps(x, _mm256_set1_ps(-__builtin_inff()), _mm256_castsi256_ps(over));
  }
  // Lane i (at index first + i) keeps x when lo <= first + i <= hi, else becomes -inf.
  static vec keep_lanes_between(vec x, int first, int lo, int hi) {
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(lo), idx),
                                        _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(hi)));
    return _mm256_blendv_ps(x, _mm256_set1_ps(-__builtin_inff()), _mm256_castsi256_ps(out));
  }
};

#ifdef LONGATTN_AVX512
struct Avx512 {
  using vec = __m512;
  static constexpr int W = 16;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec load(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static vec load(const _Float16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static vec load_bf16_even(const uint16_t* p) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16)); }
  static vec load_bf16_odd(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec set1(float x) { return _mm512_set1_ps(x); }
  static __m256 fold8(vec v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec div(vec a, vec b) { return _mm512_div_ps(a, b); }
  static vec exp(vec x) { return exp512(x); }
  static vec finite_or_zero(vec m) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m, _mm512_set1_ps(-__builtin_inff()), _CMP_EQ_OQ), m,
                                _mm512_setzero_ps());
  }
  static float hmax(vec v) { return _mm512_reduce_max_ps(v); }
  static float hsum(vec v) { return _mm512_reduce_add_ps(v); }
  static bool any_greater(vec x, float m) { return _mm512_cmp_ps_mask(x, _mm512_set1_ps(m), _CMP_GT_OQ) != 0; }
  // Lanes [lo, hi) keep x, the rest become -inf; 0 <= lo, hi <= 16.
  static vec keep_lanes(vec x, int lo, int hi) {
    const __mmask16 keep = lo < hi ? static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u)) : 0;
    return _mm512_mask_blend_ps(keep, _mm512_set1_ps(-__builtin_inff()), x);
  }
  static vec drop_after(vec x, const int32_t* limit, int32_t pos) {
    const __mmask16 over = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(pos), _mm512_loadu_si512(limit));
    return _mm512_mask_blend_ps(over, x, _mm512_set1_ps(-__builtin_inff()));
  }
  static vec keep_lanes_between(vec x, int first, int lo, int hi) {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(first),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __mmask16 keep = _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(lo)) &
                           _mm512_cmple_epi32_mask(idx, _mm512_set1_epi32(hi));
    return _mm512_mask_blend_ps(keep, _mm512_set1_ps(-__builtin_inff()), x);
  }
};
using Isa = Avx512;
#else
using Isa = Avx2;
#endif

// v, kept in a register: an empty asm makes the loaded value opaque, so gcc
// cannot fold the load into each instruction that uses it. gcc 12 re-reads
// a vector from memory as an FMA operand once per use when it judges
// registers short, which turns a kernel that loads each vector once into a
// load-port-bound one; the kernels that measured faster with it call this.
template <typename V>
inline V in_register(V v) {
#ifdef LONGATTN_AVX512
  asm("" : "+v"(v));
#else
  asm("" : "+x"(v));
#endif
  return v;
}

#endif  // LONGATTN_AVX2

}  // namespace
