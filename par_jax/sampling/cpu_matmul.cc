// A decoding step's weight matmuls for XLA:CPU (float32), registered through jax.ffi.
//
// Why a kernel: a sampling step multiplies a few rows (2 to a few hundred) by every weight matrix once. XLA:CPU runs
// these products through its YNNPACK dot runtime, which re-packs the weights and, on the first run of each compiled
// program, builds every dot's runtime (about a second of CPU per compiled sampler at size B). Here the weights are
// packed once, when the sampler prepares them (cpu_matmul.py), as panels of kNr columns, each panel (K, kNr)
// contiguous; a task takes one panel and a range of rows and, for each chunk of kKc panel rows (in L1), runs every
// block of up to kMr rows of x through it, accumulating kMr x kNr outputs in vector registers. Tasks are claimed
// from a shared counter by this thread and helpers on XLA's intra-op pool, panel-major, so each panel is read from
// memory about once per step and both cores stream different panels.
//
// Shapes (see cpu_matmul.py): x (M, K); w (P, K, kNr); y (M, P * kNr).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kW = 16;        // floats per vector
constexpr int kNr = 2 * kW;   // columns per panel: two vectors
constexpr int kMr = 8;        // rows per register tile: 16 accumulators
constexpr int64_t kKc = 128;  // panel rows per chunk: 16 KB, stays in L1 while every row block passes
constexpr int64_t kRowsPerTask = 64;

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
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    a0[r] = first ? vf{} : load(y + r * ldy);
    a1[r] = first ? vf{} : load(y + r * ldy + kW);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const vf w0 = load(w + k * kNr), w1 = load(w + k * kNr + kW);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const vf xr = vf{} + x[r * ldx + k];
      a0[r] += xr * w0;
      a1[r] += xr * w1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    store(y + r * ldy, a0[r]);
    store(y + r * ldy + kW, a1[r]);
  }
}

void TileRows(int mr, const float* x, int64_t ldx, const float* w, int64_t kc, float* y, int64_t ldy, bool first) {
  switch (mr) {
    case 8: return Tile<8>(x, ldx, w, kc, y, ldy, first);
    case 7: return Tile<7>(x, ldx, w, kc, y, ldy, first);
    case 6: return Tile<6>(x, ldx, w, kc, y, ldy, first);
    case 5: return Tile<5>(x, ldx, w, kc, y, ldy, first);
    case 4: return Tile<4>(x, ldx, w, kc, y, ldy, first);
    case 3: return Tile<3>(x, ldx, w, kc, y, ldy, first);
    case 2: return Tile<2>(x, ldx, w, kc, y, ldy, first);
    default: return Tile<1>(x, ldx, w, kc, y, ldy, first);
  }
}

// Rows [m0, m1) of y's panel p.
void PanelRows(const float* x, const float* panel, float* y, int64_t K, int64_t ldy, int64_t m0, int64_t m1) {
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    for (int64_t m = m0; m < m1; m += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, m1 - m));
      TileRows(mr, x + m * K + k0, K, panel + k0 * kNr, kc, y + m * ldy, ldy, k0 == 0);
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
  const int64_t chunks = (M + kRowsPerTask - 1) / kRowsPerTask, tasks = P * chunks;
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
  auto work = [shared, tasks, chunks, M, K, P, xp, wp, yp] {
    for (int64_t t; (t = shared->next.fetch_add(1)) < tasks;) {
      const int64_t p = t / chunks, m0 = (t % chunks) * kRowsPerTask;
      PanelRows(xp, wp + p * K * kNr, yp + p * kNr, K, P * kNr, m0, std::min(M, m0 + kRowsPerTask));
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
