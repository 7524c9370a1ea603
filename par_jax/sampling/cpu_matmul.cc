// A decoding step's weight matmuls for XLA:CPU (float32), registered through jax.ffi.
//
// Why a kernel: a sampling step multiplies a few rows (2 to a few thousand) by every weight matrix once. XLA:CPU runs
// these products through its YNNPACK dot runtime, which re-packs the weights and, on the first run of each compiled
// program, builds every dot's runtime (about a second of CPU per compiled sampler at size B). Here the weights are
// packed once, when the sampler prepares them (cpu_matmul.py), as panels of kNr columns, each panel (K, kNr)
// contiguous. The product runs register tiles of up to kMr rows x kNr columns (2 * kMr vector accumulators, an FMA
// per accumulator for each broadcast x element and pair of panel vectors), over chunks of kKc panel rows that stay in
// L1 while the tiles pass.
//
// Few rows (bandwidth bound, up to kMc): a task is one panel over every row, so each panel is read from memory once
// per step and both cores stream different panels. Many rows (compute bound): a task is a block of kMc rows by a
// group of kGroup panels, and for each K chunk the block's x (kMc, kKc) stays in L2 while the group's panel chunks
// pass; tasks go row-block major, so both cores work on the same x block and each panel is read once per row block.
// Tasks are claimed from a shared counter by this thread and helpers on XLA's intra-op pool.
//
// Shapes (see cpu_matmul.py): x (M, K); w (P, K, kNr); y (M, P * kNr).

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kW = 16;         // floats per vector
constexpr int kNr = 2 * kW;    // columns per panel: two vectors
constexpr int kMr = 8;         // rows per register tile: 16 accumulators
constexpr int64_t kKc = 128;   // panel rows per chunk: 16 KB, stays in L1 while every row tile passes
constexpr int64_t kMc = 128;   // rows per task when there are many: the x block (kMc, kKc), 64 KB, stays in L2
constexpr int64_t kGroup = 4;  // panels per task when there are many rows

typedef float vf __attribute__((vector_size(kW * sizeof(float))));

inline vf load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(vf));
  return x;
}
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }

// y[0:MR, 0:kNr] (+)= x[0:MR, 0:kc] w[0:kc, 0:kNr]; x rows ldx apart, y rows ldy apart, w dense (kc, kNr).
template <int MR>
inline void Tile(const float* x, int64_t ldx, const float* w, int64_t kc, float* y, int64_t ldy, bool first) {
  vf a0[MR], a1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    a0[r] = first ? vf{} : load(y + r * ldy);
    a1[r] = first ? vf{} : load(y + r * ldy + kW);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const vf w0 = load(w + k * kNr), w1 = load(w + k * kNr + kW);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      // x - 0 is x for every float (x + 0 is not, for -0), so this compiles to one broadcast load.
      const vf xr = x[r * ldx + k] - vf{};
      a0[r] += xr * w0;
      a1[r] += xr * w1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    store(y + r * ldy, a0[r]);
    store(y + r * ldy + kW, a1[r]);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool);

template <int... R>
constexpr std::array<TileFn, sizeof...(R)> TileTable(std::integer_sequence<int, R...>) {
  return {&Tile<R + 1>...};
}
constexpr std::array<TileFn, kMr> kTiles = TileTable(std::make_integer_sequence<int, kMr>{});  // [mr - 1]: mr rows

// Rows [m0, m1) of panels [p0, p1): for each chunk of kKc panel rows, every register tile of rows passes through
// each panel's chunk (in L1) in turn.
void Block(const float* x, const float* w, float* y, int64_t K, int64_t ldy, int64_t m0, int64_t m1, int64_t p0,
           int64_t p1) {
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = w + (p * K + k0) * kNr;
      for (int64_t m = m0; m < m1; m += kMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, m1 - m));
        kTiles[mr - 1](x + m * K + k0, K, panel, kc, y + m * ldy + p * kNr, ldy, k0 == 0);
      }
    }
  }
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kNr) {
    return ffi::Error::InvalidArgument("par_decode_matmul: expected x (M, K), w (P, K, 32), y (M, P*32)");
  }
  const int64_t M = xd[0], K = xd[1], P = wd[0];
  if (wd[1] != K || yd[0] != M || yd[1] != P * kNr) {
    return ffi::Error::InvalidArgument("par_decode_matmul: x, w and y shapes do not agree");
  }
  const bool many = M > kMc;
  const int64_t row_blocks = many ? (M + kMc - 1) / kMc : 1, group = many ? kGroup : 1;
  const int64_t groups = (P + group - 1) / group, tasks = M == 0 ? 0 : row_blocks * groups;
  if (tasks == 0) return ffi::Error::Success();
  // As in cpu_attention.cc: the caller works through the tasks itself and waits only for tasks a helper claimed,
  // so a helper whose core is descheduled never holds the step up.
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  auto work = [shared, tasks, groups, group, many, M, K, P, xp, wp, yp] {
    for (int64_t t; (t = shared->next.fetch_add(1)) < tasks;) {
      const int64_t m0 = (t / groups) * kMc, p0 = (t % groups) * group;
      Block(xp, wp, yp, K, P * kNr, m0, many ? std::min(M, m0 + kMc) : M, p0, std::min(P, p0 + group));
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  // A small product (the tiny test models) is not worth waking a helper for.
  const bool small = M * K * P * kNr < (int64_t{1} << 18);
  const int64_t helpers = small ? 0 : std::min<int64_t>(tasks, pool.num_threads()) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  while (shared->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ParDecodeMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
