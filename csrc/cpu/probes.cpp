// Machine-limit probes: the yardsticks the benchmarks divide by.
//
// longattn_fma_peak_gflops: the fp32 FMA peak of `threads` cores, a loop that keeps
//   every FMA pipe busy from registers alone (no loads, no stores);
//   longattn_fma_run: the same loop for a given amount of work, timed by the caller.
// longattn_bf16_run: the bfloat16 counterpart for a given amount of work, in
//   the fastest bf16 arithmetic of this build and process
//   (longattn_bf16_arithmetic): AMX tiles (TDPBF16PS) or AVX512-BF16 dot
//   products (VDPBF16PS), register-only as well.
// longattn_stream_read_gbs / longattn_stream_read_sum: the read bandwidth of a
//   multi-threaded streaming pass over a buffer (each thread one contiguous
//   slice), the fair limit for memory-bound kernels such as decode.
//
// Built like the other kernels (longattn/kernels/support/cpp_build.py) for
// the highest ISA level this CPU has; the loops use the widest vectors that
// build allows (simd.h's Isa: 16 lanes with AVX-512, 8 with AVX2+FMA), else
// plain scalar multiply-adds. longattn_probes_lanes says which.

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>

#include "simd.h"

#if defined(LONGATTN_AVX512BF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define LONGATTN_AMX_PROBE 1
#include "amx_tiles.h"  // opens its own anonymous namespace
#endif

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Independent FMA chains per thread. An FMA has a latency of ~4 cycles and
// cores issue up to 2 per cycle, so at least 8 chains are needed to keep the
// pipes full; 12 leave headroom and fit AVX2's 16 registers with the two
// constants.
constexpr int kChains = 12;
// FMAs per chain between clock reads: long enough that the clock costs
// nothing, short enough (~1 ms) to stop close to the requested time.
constexpr int64_t kInner = 1 << 16;

#ifdef LONGATTN_AVX2
// One thread's register-only loop, for about `seconds` or, when iterations >
// 0, for exactly that many iterations (kChains FMAs each); returns the FMAs
// (vector lanes counted) it ran. acc = acc * a + b
// with |a| < 1 converges to b / (1 - a): finite for any run length. The
// result is folded into *sink so the compiler must keep every chain.
int64_t fma_loop(double seconds, int64_t iterations, volatile float* sink) {
  using V = Isa;
  typename V::vec acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = V::set1(0.001f * static_cast<float>(c));
  const typename V::vec a = V::set1(0.999999f), b = V::set1(1e-7f);
  int64_t fmas = 0, left = iterations;
  const double stop = now_s() + seconds;
  do {
    const int64_t inner = iterations > 0 ? std::min(kInner, left) : kInner;
    for (int64_t i = 0; i < inner; ++i) {
      // Fully unrolled by the compiler (kChains is a constant): kChains
      // independent FMAs per iteration, all operands in registers.
      for (int c = 0; c < kChains; ++c) acc[c] = V::fma(acc[c], a, b);
    }
    fmas += inner * kChains * V::W;
    left -= inner;
  } while (iterations > 0 ? left > 0 : now_s() < stop);
  typename V::vec total = acc[0];
  for (int c = 1; c < kChains; ++c) total = V::add(total, acc[c]);
  *sink = hsum(V::fold8(total));
  return fmas;
}
#else
int64_t fma_loop(double seconds, int64_t iterations, volatile float* sink) {
  float acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = 0.001f * static_cast<float>(c);
  const float a = 0.999999f, b = 1e-7f;
  int64_t fmas = 0, left = iterations;
  const double stop = now_s() + seconds;
  do {
    const int64_t inner = iterations > 0 ? std::min(kInner, left) : kInner;
    for (int64_t i = 0; i < inner; ++i) {
      for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * a + b;
    }
    fmas += inner * kChains;
    left -= inner;
  } while (iterations > 0 ? left > 0 : now_s() < stop);
  float total = 0.0f;
  for (int c = 0; c < kChains; ++c) total += acc[c];
  *sink = total;
  return fmas;
}
#endif

// Floats summed in float accumulators before the partial goes into a double
// (64 KiB): keeps the sum accurate over GiBs at no measurable cost.
constexpr int64_t kBlock = 16384;

// Sum of data[begin, end) read once, front to back.
double read_slice(const float* data, int64_t begin, int64_t end) {
  double sum = 0.0;
  int64_t i = begin;
#ifdef LONGATTN_AVX2
  using V = Isa;
  constexpr int U = 4;  // independent accumulators: the adds never wait on each other
  while (end - i >= U * V::W) {
    const int64_t block_end = std::min(end, i + kBlock);
    typename V::vec acc[U];
    for (int u = 0; u < U; ++u) acc[u] = V::zero();
    for (; block_end - i >= U * V::W; i += U * V::W) {
      for (int u = 0; u < U; ++u) acc[u] = V::add(acc[u], V::load(data + i + u * V::W));
    }
    sum += static_cast<double>(hsum(V::fold8(V::add(V::add(acc[0], acc[1]), V::add(acc[2], acc[3])))));
  }
#endif
  float tail = 0.0f;
  for (; i < end; ++i) tail += data[i];
  return sum + tail;
}

// One timed pass (seconds) over data[0, n) by `threads` threads; *sum gets its sum.
double read_pass(const float* data, int64_t n, int threads, double* sum) {
  double total = 0.0;
  const double start = now_s();
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
    // Contiguous slices, boundaries on 64-byte (16-float) lines so no cache
    // line is split between two threads.
    const int64_t per = (n / team + 15) / 16 * 16;
    const int64_t begin = std::min(n, t * per), end = t + 1 == team ? n : std::min(n, begin + per);
    total += read_slice(data, begin, end);
  }
  const double elapsed = now_s() - start;
  *sum = total;
  return elapsed;
}

}  // namespace

namespace {

#ifdef LONGATTN_AVX512BF16
// kChains independent VDPBF16PS chains for `iterations` iterations; returns
// the instructions run. Each adds 2 x (1/128)^2 per lane per iteration: finite
// for any run length; the sum escapes through *sink.
int64_t bf16_dot_loop(int64_t iterations, volatile float* sink) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_setzero_ps();
  const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3c00);  // bf16 1/128 in every half
  for (int64_t i = 0; i < iterations; ++i)
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], x, x);
  __m512 total = acc[0];
  for (int c = 1; c < kChains; ++c) total = _mm512_add_ps(total, acc[c]);
  *sink = _mm512_reduce_add_ps(total);
  return iterations * kChains;
}
#endif

#ifdef LONGATTN_AMX_PROBE
// Four independent TDPBF16PS per iteration (C tiles 0..3 from A tiles 4, 5
// and B tiles 6, 7: a 2 x 2 block, as a GEMM keeps them), operands loaded
// once; returns the instructions run. Every tile is 16 rows x 64 bytes; the
// inputs are bf16 1/128, so C grows by 32 x 2^-14 per product: finite.
int64_t amx_loop(int64_t iterations, volatile float* sink) {
  amx::Config config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  amx::configure(config);
  alignas(64) uint16_t operand[16 * 32];
  std::fill(operand, operand + 16 * 32, static_cast<uint16_t>(0x3c00));
  amx::load<4>(operand, 64);
  amx::load<5>(operand, 64);
  amx::load<6>(operand, 64);
  amx::load<7>(operand, 64);
  amx::zero<0>();
  amx::zero<1>();
  amx::zero<2>();
  amx::zero<3>();
  for (int64_t i = 0; i < iterations; ++i) {
    amx::dp_bf16<0, 4, 6>();
    amx::dp_bf16<1, 4, 7>();
    amx::dp_bf16<2, 5, 6>();
    amx::dp_bf16<3, 5, 7>();
  }
  alignas(64) float out[16 * 16];
  amx::store<0>(out, 64);
  amx::release();
  *sink = out[0];
  return 4 * iterations;
}
#endif

}  // namespace

extern "C" {

// Vector lanes the probes use: 16 (AVX-512), 8 (AVX2+FMA) or 1 (scalar).
int longattn_probes_lanes() {
#ifdef LONGATTN_AVX2
  return Isa::W;
#else
  return 1;
#endif
}

// fp32 FMA peak in GFLOP/s (2 flops per lane per FMA) of `threads` threads,
// each running the register-only loop for about `seconds`. Returns -1 for
// threads < 1 or seconds not in (0, 3600].
double longattn_fma_peak_gflops(int threads, double seconds) {
  if (threads < 1 || !(seconds > 0.0 && seconds <= 3600.0)) return -1.0;
  int64_t fmas = 0;
  volatile float sink = 0.0f;
  const double start = now_s();
#pragma omp parallel num_threads(threads) reduction(+ : fmas)
  {
    volatile float mine = 0.0f;
    fmas += fma_loop(seconds, 0, &mine);
#pragma omp atomic
    sink += mine;  // the chains' value escapes: nothing can be dropped
  }
  const double elapsed = now_s() - start;  // wall time of the team, the slowest thread included
  return 2.0 * static_cast<double>(fmas) / elapsed * 1e-9;
}

// The same loop run for a fixed amount of work: at least `flops` flops (2
// per lane per FMA) shared evenly by `threads` threads, rounded up to whole
// iterations (kChains FMAs on longattn_probes_lanes() lanes). Returns the
// flops run, or -1 for threads < 1 or flops not in [1, 1e15]. The caller
// times it: the benchmarks run it with a case's own flop count in the same
// interleaved rounds as the kernels, so the peak and the kernels are
// measured at the same moments (a shared VM's speed moves within minutes).
double longattn_fma_run(int threads, double flops) {
  if (threads < 1 || !(flops >= 1.0 && flops <= 1e15)) return -1.0;
  const double per_iteration = 2.0 * kChains * longattn_probes_lanes();
  const auto iterations = static_cast<int64_t>(std::ceil(flops / threads / per_iteration));
  int64_t fmas = 0;
  volatile float sink = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : fmas)
  {
    volatile float mine = 0.0f;
    fmas += fma_loop(0.0, iterations, &mine);
#pragma omp atomic
    sink += mine;
  }
  return 2.0 * static_cast<double>(fmas);
}

// The bfloat16 arithmetic longattn_bf16_run uses: 2 = AMX tiles (the build
// targets them and the OS granted this process AMX state), 1 = AVX512-BF16
// dot products, 0 = none (bfloat16 is then computed in float32: the FMA loop
// is its limit).
int longattn_bf16_arithmetic() {
#ifdef LONGATTN_AMX_PROBE
  if (amx_ready()) return 2;
#endif
#ifdef LONGATTN_AVX512BF16
  return 1;
#else
  return 0;
#endif
}

// At least `flops` flops of that arithmetic (a TDPBF16PS is 16 x 16 x 32
// multiply-adds, a VDPBF16PS 16 x 2), shared evenly by `threads` threads and
// rounded up to whole iterations, register-only; returns the flops run. The
// caller times it, as for longattn_fma_run. -1 for threads < 1 or flops not
// in [1, 1e15]; -2 when longattn_bf16_arithmetic() is 0.
double longattn_bf16_run(int threads, double flops) {
  if (threads < 1 || !(flops >= 1.0 && flops <= 1e15)) return -1.0;
  const int arithmetic = longattn_bf16_arithmetic();
  if (arithmetic == 0) return -2.0;
  const double per_instruction = arithmetic == 2 ? 2.0 * 16 * 16 * 32 : 2.0 * 16 * 2;
  const double per_iteration = per_instruction * (arithmetic == 2 ? 4 : kChains);
  const auto iterations = static_cast<int64_t>(std::ceil(flops / threads / per_iteration));
  (void)iterations;  // unused in a build with neither loop (arithmetic 0 returned above)
  int64_t instructions = 0;
  volatile float sink = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : instructions)
  {
    volatile float mine = 0.0f;
#ifdef LONGATTN_AMX_PROBE
    if (arithmetic == 2) instructions += amx_loop(iterations, &mine);
#endif
#ifdef LONGATTN_AVX512BF16
    if (arithmetic == 1) instructions += bf16_dot_loop(iterations, &mine);
#endif
#pragma omp atomic
    sink += mine;
  }
  return per_instruction * static_cast<double>(instructions);
}

// Read bandwidth in GB/s (1e9 bytes/s): the best of `repeats` passes over
// data[0, n) (float32, any alignment) by `threads` threads, each reading a
// contiguous slice. *sum (if not null) gets the data's sum (double-accumulated
// per 64 KiB block): proof that every element was read. Returns -1 for
// n < 1, threads < 1 or repeats < 1.
double longattn_stream_read_sum(const float* data, long long n, int threads, int repeats, double* sum) {
  if (data == nullptr || n < 1 || threads < 1 || repeats < 1) return -1.0;
  double best = 0.0, total = 0.0;
  for (int r = 0; r < repeats; ++r) {
    const double elapsed = read_pass(data, n, threads, &total);
    // The best pass is the limit: a slower one was disturbed (other processes
    // on the shared cores, page-table warm-up), never faster than memory.
    best = std::max(best, static_cast<double>(n) * sizeof(float) / std::max(elapsed, 1e-9) * 1e-9);
  }
  if (sum != nullptr) *sum = total;
  return best;
}

double longattn_stream_read_gbs(const float* data, long long n, int threads, int repeats) {
  double sum = 0.0;
  const double gbs = longattn_stream_read_sum(data, n, threads, repeats, &sum);
  volatile double keep = sum;  // the sum escapes: the reads cannot be optimized away
  (void)keep;
  return gbs;
}

}  // extern "C"
