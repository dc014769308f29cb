"""The CUDA stream-K decode twin (csrc/cuda/decode_streamk.cu).

What runs where:
- with ``nvcc`` on the PATH: the source compiles for sm_80 and sm_90 with
  warnings as errors (runs on this CPU-only machine);
- anywhere: the launch arguments the loader builds match the kernels'
  parameter lists in the source (count, order, pointer element types and
  scalar widths): a mismatch there would be silent memory corruption;
- with ``g++`` (C++20): the kernels *run on the CPU* in an emulation of the
  CUDA execution model (one fiber per CUDA thread, barriers for
  ``__syncthreads`` and warp shuffles, warps run one at a time in a random
  order between block barriers, shared memory poisoned with NaN per
  block), fed by the loader's own launch arguments, and are checked
  against the oracle. This verifies the algorithm, indexing and
  synchronisation, not GPU-only behaviour (memory model, occupancy,
  shared-memory limits, NVRTC);
- with a CUDA device and cupy: results against the float64 oracle
  (tolerance rule, eager twin as baseline) and bitwise determinism.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.decode import plan_decode
from longattn.kernels.decode.cache import check_cache
from longattn.kernels.decode import cuda as decode_cuda
from longattn.kernels.decode.eager import decode_forward_eager
from longattn.masking import effective_window
from tests.decode.decode_cases import DecodeCase
from tests.nvcc_check import NVCC, assert_nvcc_compiles
from tests.tolerance import assert_close_to_oracle



@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH (the CUDA source is compile-checked only with it)")
def test_source_compiles_for_sm80_and_sm90():
    assert_nvcc_compiles(decode_cuda.SOURCE)


def macro_params(name: str, source=None) -> list[str]:
    """Parameter types of ``#define name(T) ...`` in a CUDA source (default: the
    decode kernel's), e.g. ``['const T *', 'int', ...]``."""
    source = decode_cuda.SOURCE if source is None else source
    text = source.read_text()
    body = re.search(rf"#define {name}\(T\)(.*?)\n(?=#define)", text, re.S)
    assert body, f"macro {name} not found in {source}"
    params = body.group(1).replace("\\\n", " ").split(",")
    # "const T *q" -> "const T *": drop the trailing parameter name, keep the pointer star.
    return [re.sub(r"\s+", " ", re.sub(r"\w+\s*$", "", p.strip()).replace("*", " *")).strip() for p in params]


def check_launch_args(param_types: list[str], args: tuple, dtype: torch.dtype) -> None:
    assert len(args) == len(param_types), f"{len(args)} arguments for {len(param_types)} parameters"
    pointee = {"T": dtype, "float": torch.float32, "int": torch.int32}
    for i, (ptype, arg) in enumerate(zip(param_types, args)):
        if ptype.endswith("*"):
            base = ptype.replace("const", "").replace("*", "").strip()
            assert isinstance(arg, torch.Tensor), f"parameter {i} ({ptype}) got {type(arg).__name__}"
            assert arg.dtype == pointee[base], f"parameter {i} ({ptype}) got a {arg.dtype} tensor"
        else:
            want = {"long long": np.int64, "int": np.int32, "float": np.float32}[ptype]
            assert type(arg) is want, f"parameter {i} ({ptype}) got {type(arg).__name__}"


@pytest.mark.parametrize("page_size", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads_per_tile", [1, 2])
def test_launch_arguments_match_the_kernel_signatures(page_size, dtype, heads_per_tile):
    case = DecodeCase((9, 0, 30), 0, 2, 2, 4, 24, dtype, page_size, True, (-1, -1), 0.0, seed=1)
    q, k_cache, v_cache, kwargs, _, _ = case.build()
    plan = plan_decode(case.seqlens, nheads_k=2, num_workers=5, block_n=4, heads_per_tile=heads_per_tile)
    out, lse, launches = decode_cuda.prepare_launches(
        q, k_cache, v_cache, kwargs["cache_seqlens"], kwargs.get("block_table"),
        scale=0.2, window=(-1, 0), softcap=0.0, plan=plan)
    assert [launch.name.rsplit("_", 1)[0] for launch in launches] == ["streamk_partial", "streamk_merge"]
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    partial, merge = launches
    check_launch_args(macro_params("LONGATTN_PARTIAL_PARAMS"), partial.args, dtype)
    check_launch_args(macro_params("LONGATTN_MERGE_PARAMS"), merge.args, dtype)
    # Workspace: one row per (slot, kv head of the tile, query row), float32.
    slots = sum(len(s) for s in plan.contributors if len(s) > 1)
    assert partial.args[6].numel() == slots * heads_per_tile * case.group * case.seqlen_q
    assert partial.shared_mem == decode_cuda.streamk_smem_bytes(24)
    # Merge grid: (tiles with partials, headdim column blocks of MERGE_COLS).
    merge_tiles = [t for t, s in enumerate(plan.contributors) if len(s) > 1]
    assert merge.grid == (len(merge_tiles), -(-24 // decode_cuda.MERGE_COLS))
    assert merge.args[4].tolist() == merge_tiles
    src = decode_cuda.SOURCE.read_text()
    for name, value in (("kThreads", None), ("kRows", decode_cuda.ROWS), ("kBlockN", decode_cuda.BLOCK_N),
                        ("kMaxDim", decode_cuda.MAX_HEADDIM), ("kMergeCols", decode_cuda.MERGE_COLS)):
        if value is not None:
            assert re.search(rf"constexpr int {name} = {value};", src), f"{name} != {value} in the source"


# --- CPU emulation of the CUDA kernels (g++) ---------------------------------

_EMU_FP16 = """#pragma once
#include <cstring>
struct __half { unsigned short bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h, 2); return (float)f; }
inline __half __float2half_rn(float x) { _Float16 f = (_Float16)x; __half h; std::memcpy(&h, &f, 2); return h; }
"""
_EMU_BF16 = """#pragma once
#include <cstring>
struct __nv_bfloat16 { unsigned short bits; };
inline float __bfloat162float(__nv_bfloat16 b) { unsigned u = (unsigned)b.bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {  // round to nearest even (finite inputs)
  unsigned u; std::memcpy(&u, &x, 4); u += 0x7fffu + ((u >> 16) & 1u); return {(unsigned short)(u >> 16)};
}
"""
# Each CUDA thread of a block is a fiber on the calling OS thread; blocks run one
# after another. __syncthreads is a barrier over the block; a shuffle is a write, a warp
# barrier, a read and another warp barrier. A fiber runs until it waits at a barrier. The
# schedule is adversarial and seeded (by the launch count): the warps take turns in a random
# order, each running alone (its lanes resumed in a fresh random order per sweep) until all
# of its lanes wait at the block barrier. So a warp runs a whole barrier phase -- e.g. a
# compute loop and the next block's shared writes -- before or after another warp's phase,
# and code that reads another thread's shared-memory write without a barrier in between
# reads the NaN poison or the wrong block's values. (One std::thread per CUDA thread, the
# earlier emulation, interleaved warps finely and missed such races; on two cores each
# barrier of 128 threads also cost futex wake-ups: about two minutes for this file's cases.)
_EMU_PRELUDE = """#pragma once
#include <math.h>
#if !defined(__x86_64__) || defined(LONGATTN_EMU_UCONTEXT)
#include <ucontext.h>
#endif
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(n)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__
struct Dim3 { int x, y, z; };
inline Dim3 threadIdx, blockIdx;  // set by the scheduler before it resumes a fiber
inline Dim3 blockDim{128, 1, 1};
struct EmuBarrier { int expected, arrived; unsigned generation; };
inline EmuBarrier g_block, g_warp[32];
// A fiber's saved context and the switch between two. On x86-64 a switch saves only what
// the calling convention says a call preserves (6 registers, the SSE and x87 control words)
// and changes stacks: glibc's swapcontext also saves the signal mask with a system call on
// every switch, which took most of the emulation's time. Elsewhere (or built with
// -DLONGATTN_EMU_UCONTEXT, as checked by hand on x86-64): ucontext.
#if defined(__x86_64__) && !defined(LONGATTN_EMU_UCONTEXT)
extern "C" __attribute__((visibility("hidden"))) void emu_switch_x86_64(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl emu_switch_x86_64
  .hidden emu_switch_x86_64
  .type emu_switch_x86_64, @function
emu_switch_x86_64:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_x86_64, .-emu_switch_x86_64
)");
struct EmuFiber { void* sp; };
inline void emu_switch(EmuFiber& from, EmuFiber& to) { emu_switch_x86_64(&from.sp, to.sp); }
inline void emu_start(EmuFiber& f, char* stack, size_t size, void (*entry)()) {
  // The frame the switch pops: control words, 6 registers, then `entry` as the return
  // address, placed so that entry starts with the stack aligned as after a call.
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 16 - 7 * 8);
  unsigned mxcsr; unsigned short fpucw;
  asm volatile("stmxcsr %0; fnstcw %1" : "=m"(mxcsr), "=m"(fpucw));
  frame[0] = mxcsr | (uint64_t(fpucw) << 32);
  for (int i = 1; i < 7; ++i) frame[i] = 0;
  frame[7] = reinterpret_cast<uint64_t>(entry);
  f.sp = frame;
}
#else
struct EmuFiber { ucontext_t ctx; };
inline void emu_switch(EmuFiber& from, EmuFiber& to) { swapcontext(&from.ctx, &to.ctx); }
inline void emu_start(EmuFiber& f, char* stack, size_t size, void (*entry)()) {
  getcontext(&f.ctx);
  f.ctx.uc_stack = {stack, 0, size};
  f.ctx.uc_link = nullptr;  // entry never returns: it switches back to the scheduler
  makecontext(&f.ctx, entry, 0);
}
#endif
inline EmuFiber g_scheduler;
inline EmuFiber* g_running;  // the running fiber
inline unsigned long long g_progress;  // arrivals and finished fibers: a sweep without any is a deadlock
inline void emu_arrive_and_wait(EmuBarrier& b) {
  const unsigned generation = b.generation;
  ++g_progress;
  if (++b.arrived == b.expected) { b.arrived = 0; ++b.generation; return; }
  while (b.generation == generation) emu_switch(*g_running, g_scheduler);
}
inline void __syncthreads() { emu_arrive_and_wait(g_block); }
inline float g_lanes[32][32];
inline float emu_shfl(float x, int src) {
  const int w = threadIdx.x / 32;
  g_lanes[w][threadIdx.x % 32] = x;
  emu_arrive_and_wait(g_warp[w]);
  const float r = g_lanes[w][src];
  emu_arrive_and_wait(g_warp[w]);
  return r;
}
inline float __shfl_xor_sync(unsigned, float x, int o) { return emu_shfl(x, (threadIdx.x % 32) ^ o); }
inline float __shfl_sync(unsigned, float x, int src) { return emu_shfl(x, src); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
using std::max;
using std::min;
// The kernels' extern __shared__ array: 256 KiB, above any GPU's per-block limit (227 KiB on an H100).
namespace { alignas(16) unsigned char smem_raw[256 << 10]; }
inline void* g_body;
inline void (*g_invoke)(void*);
inline bool g_finished;
inline void emu_fiber_entry() {
  g_invoke(g_body);
  g_finished = true;
  emu_switch(*g_running, g_scheduler);  // never resumed
  std::abort();
}
inline unsigned long long g_launches;
template <class F> void emu_grid(int gx, int gy, F body) {
  constexpr size_t kStack = 256 << 10;
  const int n = blockDim.x;
  static std::vector<std::vector<char>> stacks;
  stacks.resize(n, std::vector<char>(kStack));
  std::vector<EmuFiber> fibers(n);
  std::vector<int> warp_order(n / 32), lane_order(32);
  g_body = &body;
  g_invoke = [](void* f) { (*static_cast<F*>(f))(); };
  unsigned long long rng = 0x9e3779b97f4a7c15ull * ++g_launches;  // xorshift64: this launch's schedules
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) {
      std::memset(smem_raw, 0xff, sizeof smem_raw);  // NaN: reading unwritten shared memory shows
      g_block = {n, 0, 0};
      for (int w = 0; w < n / 32; ++w) g_warp[w] = {32, 0, 0};
      blockIdx = {bx, by, 0};
      for (int t = 0; t < n; ++t) {
        emu_start(fibers[t], stacks[t].data(), kStack, emu_fiber_entry);
      }
      std::vector<char> done(n, 0);
      int live = n;
      auto shuffle = [&rng](std::vector<int>& v, int count) {  // Fisher-Yates with xorshift64
        std::iota(v.begin(), v.begin() + count, 0);
        for (int i = count - 1; i > 0; --i) {
          rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
          std::swap(v[i], v[rng % (i + 1)]);
        }
      };
      while (live > 0) {
        const unsigned long long round_start = g_progress;
        shuffle(warp_order, n / 32);
        for (int wi = 0; wi < n / 32; ++wi) {
          const int w = warp_order[wi];
          for (unsigned long long before = ~0ull; before != g_progress;) {  // until none of its lanes moves
            before = g_progress;
            shuffle(lane_order, 32);
            for (int lane : lane_order) {
              const int t = w * 32 + lane;
              if (done[t]) continue;
              threadIdx = {t, 0, 0};
              g_running = &fibers[t];
              g_finished = false;
              emu_switch(g_scheduler, fibers[t]);
              if (g_finished) { done[t] = 1; --live; ++g_progress; }
            }
          }
        }
        if (live > 0 && g_progress == round_start) {
          std::fprintf(stderr, "CUDA emulation: deadlock in block (%d, %d): a barrier not reached by all\\n", bx, by);
          std::abort();
        }
      }
    }
}
"""
_EMU_HARNESS = """#include "decode_streamk.cu"
#define EMU_LAUNCH(SUFFIX, T)                                                      \\
  extern "C" void emu_partial_##SUFFIX(int gx, int gy, LONGATTN_PARTIAL_PARAMS(T)) { \\
    emu_grid(gx, gy, [&] { streamk_partial_##SUFFIX(LONGATTN_PARTIAL_ARGS); });     \\
  }                                                                                \\
  extern "C" void emu_merge_##SUFFIX(int gx, int gy, LONGATTN_MERGE_PARAMS(T)) {    \\
    emu_grid(gx, gy, [&] { streamk_merge_##SUFFIX(LONGATTN_MERGE_ARGS); });         \\
  }
EMU_LAUNCH(f32, float)
EMU_LAUNCH(f16, __half)
EMU_LAUNCH(bf16, __nv_bfloat16)
"""


def build_emulation(harness: str, source_dir, timeout: int = 120):
    """Yield the CUDA sources in ``source_dir`` compiled with ``harness`` for the
    CPU emulation of the CUDA execution model, as a ctypes library (a
    generator for module fixtures; skips when g++ cannot build it).

    The library is kept (:func:`tests.tool_cache.cache_path`: g++'s version,
    the flags, the generated headers and harness, every file in
    ``source_dir``): each module and xdist worker built it again before
    (10-20 s each); an edit to any of those builds anew."""
    import tempfile

    from tests.tool_cache import cache_path

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on the PATH (needed to run the CUDA kernels in the CPU emulation)")
    files = (("cuda_fp16.h", _EMU_FP16), ("cuda_bf16.h", _EMU_BF16), ("prelude.h", _EMU_PRELUDE),
             ("harness.cpp", harness))
    flags = ["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread"]
    cached = cache_path("cuda-emulation", "emu", ".so", gxx, flags, dict(files), Path(source_dir))
    if not cached.exists():
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files:
                with open(f"{tmp}/{name}", "w") as f:
                    f.write(text)
            cmd = [gxx, *flags, f"-I{tmp}", f"-I{source_dir}", "-include", "prelude.h", f"{tmp}/harness.cpp",
                   "-o", f"{tmp}/emu.so"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:  # an old toolchain (no C++20, no _Float16); nvcc checks the source
                pytest.skip(f"g++ cannot build the CUDA emulation: {proc.stderr.strip()[-300:]}")
            cached.parent.mkdir(parents=True, exist_ok=True)
            staged = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp")
            shutil.copyfile(f"{tmp}/emu.so", staged)
            os.replace(staged, cached)  # whole or absent, whatever another worker does meanwhile
    yield ctypes.CDLL(str(cached))


@pytest.fixture(scope="module")
def emulated():
    """The CUDA source compiled for the CPU emulation, as a ctypes library."""
    yield from build_emulation(_EMU_HARNESS, decode_cuda.SOURCE.parent)


def _emulate(lib, case: DecodeCase, num_workers: int, block_n: int, heads_per_tile: int = 1):
    q, k_cache, v_cache, kwargs, logical_k, logical_v = case.build()
    view = check_cache(q, k_cache, v_cache, kwargs["cache_seqlens"], kwargs.get("block_table"),
                       kwargs.get("k_new"), kwargs.get("v_new"))
    plan = plan_decode(view.seqlens, nheads_k=case.nheads_k, num_workers=num_workers, block_n=block_n,
                       heads_per_tile=heads_per_tile)
    args = (q, view.k_cache, view.v_cache, view.seqlens, view.block_table)
    params = dict(scale=case.headdim ** -0.5, window=effective_window(case.causal, case.window_size),
                  softcap=case.softcap)
    scalar = {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int, np.float32: ctypes.c_float}
    results, merge_col_blocks = [], []
    for _ in range(2):  # twice: bitwise determinism
        out, lse, launches = decode_cuda.prepare_launches(*args, **params, plan=plan)
        for launch in launches:
            _, kind, suffix = launch.name.split("_")
            if kind == "merge":  # one CTA per (split tile, headdim column block)
                assert launch.grid[1:] == (-(-case.headdim // decode_cuda.MERGE_COLS),)
                merge_col_blocks.append(launch.grid[1])
            c_args = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else scalar[type(a)](a.item())
                      for a in launch.args]
            getattr(lib, f"emu_{kind}_{suffix}")(*(ctypes.c_int(g) for g in launch.grid), *c_args)
        results.append((out, lse))
    (out, lse), again = results
    eager_out, eager_lse = decode_forward_eager(*args, **params)
    ref_out, ref_lse = case.oracle(q, logical_k, logical_v)
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])
    return merge_col_blocks


# (case, num_workers, block_n, heads_per_tile); DecodeCase fields: cache_seqlens, seqlen_new, seqlen_q,
# nheads_k, group, headdim, dtype, page_size, causal, window_size, softcap, seed.
_EMU_CASES = {
    "ragged-paged3-fp16-window-softcap": (DecodeCase((0, 37, 1), 2, 3, 2, 4, 40, torch.float16, 3, True, (9, -1), 4.0, 1), 3, 8, 1),
    "contiguous-bf16-one-worker": (DecodeCase((45, 7), 0, 2, 1, 8, 64, torch.bfloat16, None, True, (-1, -1), 0.0, 2), 1, 16, 1),
    "page1-fp32-many-workers": (DecodeCase((33, 0, 12), 1, 5, 2, 1, 24, torch.float32, 1, False, (6, 2), 0.0, 3), 40, 4, 1),
    "gqa8-seqlen_q8-hd256-page16": (DecodeCase((70,), 0, 8, 1, 8, 256, torch.float32, 16, True, (-1, -1), 0.0, 4), 3, 16, 1),
    "heads-per-tile-2": (DecodeCase((50, 9), 0, 2, 2, 4, 32, torch.float16, 3, True, (-1, -1), 0.0, 5), 3, 8, 2),
    "split-tile-with-empty-rows": (DecodeCase((5, 0), 0, 8, 1, 4, 16, torch.float32, None, True, (-1, -1), 0.0, 6), 50, 2, 1),
    # Merge over 3 headdim column blocks (32 + 32 + 8), two kv heads per tile, empty rows (window).
    "merge-hd72-three-column-blocks": (DecodeCase((61, 3), 0, 3, 2, 2, 72, torch.bfloat16, 5, True, (4, -1), 0.0, 7), 7, 8, 2),
}
# Cases whose merge runs over several headdim column blocks (checked to really split tiles).
_MULTI_COLUMN_MERGE = ("gqa8-seqlen_q8-hd256-page16", "merge-hd72-three-column-blocks")


@pytest.mark.parametrize("name", list(_EMU_CASES))
def test_kernels_match_oracle_in_cpu_emulation(emulated, name):
    case, num_workers, block_n, heads_per_tile = _EMU_CASES[name]
    merge_col_blocks = _emulate(emulated, case, num_workers, block_n, heads_per_tile)
    if name in _MULTI_COLUMN_MERGE:
        assert merge_col_blocks and min(merge_col_blocks) > 1


# Kernels that break the rules, to show the emulation catches what the real kernels must not do.
_EMU_RULE_BREAKERS = """__global__ void neighbour(float* out, int sync) {  // reads thread t+1's shared write
  float* s = reinterpret_cast<float*>(smem_raw);  // the prelude's array (the kernels' extern __shared__)
  const int t = threadIdx.x;
  s[t] = (float)t;
  if (sync) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = s[(t + 1) % blockDim.x];
}
__global__ void divergent_barrier() { if (threadIdx.x == 0) __syncthreads(); }
extern "C" void emu_neighbour(int gx, float* out, int sync) { emu_grid(gx, 1, [&] { neighbour(out, sync); }); }
extern "C" void emu_divergent_barrier() { emu_grid(1, 1, [&] { divergent_barrier(); }); }
"""


@pytest.fixture(scope="module")
def rule_breakers():
    yield from build_emulation(_EMU_RULE_BREAKERS, decode_cuda.SOURCE.parent)


def test_emulation_catches_a_missing_barrier(rule_breakers):
    out = torch.empty(4 * 128)
    rule_breakers.emu_neighbour(4, ctypes.c_void_p(out.data_ptr()), 1)
    assert torch.equal(out, (torch.arange(4 * 128) + 1).remainder(128).float())
    # Without the barrier, a thread scheduled before its neighbour reads the NaN poison.
    rule_breakers.emu_neighbour(4, ctypes.c_void_p(out.data_ptr()), 0)
    assert out.isnan().any()


def test_emulation_aborts_on_a_barrier_not_all_threads_reach(rule_breakers):
    import sys

    script = f"import ctypes; ctypes.CDLL({rule_breakers._name!r}).emu_divergent_barrier()"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "deadlock in block (0, 0)" in run.stderr


def test_unavailable_reason_is_one_line():
    reason = decode_cuda.cuda_unavailable_reason()
    assert reason is None or (reason and "\n" not in reason)


# --- runtime (a CUDA device and cupy) ---------------------------------------

_REASON = decode_cuda.cuda_unavailable_reason()
requires_gpu = pytest.mark.skipif(_REASON is not None, reason=f"CUDA twin cannot run here: {_REASON}")


# Decode calls drawn for the property tests: on a GPU, and in the CPU emulation.
_CASES = st.builds(
    DecodeCase,
    cache_seqlens=st.lists(st.sampled_from([0, 1, 17, 64, 200]), min_size=1, max_size=3).map(tuple),
    seqlen_new=st.sampled_from([0, 1]),
    seqlen_q=st.integers(1, 8),
    nheads_k=st.integers(1, 2),
    group=st.sampled_from([1, 4, 8]),
    headdim=st.sampled_from([16, 40, 128, 256]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    page_size=st.sampled_from([None, 1, 3, 16]),
    causal=st.booleans(),
    window_size=st.sampled_from([(-1, -1), (7, -1), (30, 0)]),
    softcap=st.sampled_from([0.0, 4.0]),
    seed=st.integers(0, 2**31 - 1),
)


@given(case=_CASES, num_workers=st.sampled_from([1, 3, 40]), block_n=st.sampled_from([4, 64]),
       heads_per_tile=st.sampled_from([1, 2]))
def test_kernels_match_oracle_in_cpu_emulation_for_any_call(emulated, case, num_workers, block_n, heads_per_tile):
    """The GPU property test's calls, run in the emulation (fewer workers: each CTA is emulated
    one after another): output and lse against the oracle, bitwise equal across two schedules."""
    if case.nheads_k % heads_per_tile:
        heads_per_tile = 1
    _emulate(emulated, case, num_workers, block_n, heads_per_tile)


@requires_gpu
@given(case=_CASES, num_workers=st.sampled_from([1, 3, 1000]), block_n=st.sampled_from([4, 64]))
@settings(max_examples=50)
def test_matches_oracle_on_gpu(case, num_workers, block_n):
    q, k_cache, v_cache, kwargs, logical_k, logical_v = case.build()
    q, k_cache, v_cache = (t.cuda() for t in (q, k_cache, v_cache))
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    view = check_cache(q, k_cache, v_cache, kwargs["cache_seqlens"], kwargs.get("block_table"),
                       kwargs.get("k_new"), kwargs.get("v_new"))
    plan = plan_decode(view.seqlens, nheads_k=case.nheads_k, num_workers=num_workers, block_n=block_n)
    args = (q, view.k_cache, view.v_cache, view.seqlens, view.block_table)
    params = dict(scale=case.headdim ** -0.5, window=effective_window(case.causal, case.window_size),
                  softcap=case.softcap)
    out, lse = decode_cuda.decode_forward_cuda(*args, **params, plan=plan)
    eager_out, eager_lse = decode_forward_eager(*args, **params)
    ref_out, ref_lse = case.oracle(q.cpu(), logical_k, logical_v)
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")
    again = decode_cuda.decode_forward_cuda(*args, **params, plan=plan)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])  # deterministic for a fixed plan


@requires_gpu
def test_public_front_door_on_gpu():
    import longattn

    case = DecodeCase((40, 0, 333), 1, 2, 2, 4, 64, torch.bfloat16, 16, True, (-1, -1), 0.0, seed=3)
    q, k_cache, v_cache, kwargs, logical_k, logical_v = case.build()
    q, k_cache, v_cache = (t.cuda() for t in (q, k_cache, v_cache))
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    out, lse = longattn.decode_attention(q, k_cache, v_cache, **kwargs, backend="cuda", return_lse=True)
    eager = longattn.decode_attention(q, k_eager, v_eager, **kwargs, backend="eager", return_lse=True)
    ref_out, ref_lse = case.oracle(q.cpu(), logical_k, logical_v)
    assert_close_to_oracle(out, ref_out, eager[0])
    assert_close_to_oracle(lse, ref_lse, eager[1], name="lse")
