// Attention of a decoding step over the KV cache, for XLA:CPU (float32), registered through jax.ffi.
//
// Why a kernel: XLA:CPU runs this step's attention (a few queries per head against a cache of a few hundred
// positions) as batched small matrix products on one thread, at about 3 GB/s of cache read, while the weight
// matmuls around it use every core; at 16 queries per step it was ~25% of the sampler's time (docs/benchmarks.md).
// Here each (row, head) pair is one task (key rows streamed for few queries, packed 32-position panels with 8 queries x
// 32 positions of scores in registers for more), a masked softmax and the value product, spread over XLA's intra-op
// thread pool.
//
// Shapes (see cpu_attention.py): q (R, Q, H, D); k, v (R, H, D, S) (the sampler's cache layout); mask (Q, S) bool;
// out (R, Q, H, D). Same math as decode.layers: scores * 1/sqrt(D) in float32, masked positions at
// float32's lowest value, softmax, then probabilities times values.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kW = 16;  // floats per vector
typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));

inline vf load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(vf));
  return x;
}
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }
inline vf splat(float x) { return vf{} + x; }
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
inline float hsum(vf x) {  // pairwise halves: 4 adds, not 15
  vf8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// exp for x <= 0 (softmax after subtracting the max): 2^n * e^r with |r| <= ln2/2, degree-6 polynomial
// (relative error ~2e-7); below -87 the result is 0, as the float32 exp underflows there anyway.
inline vf exp_nonpositive(vf x) {
  const vf lo = splat(-87.0f);
  vf xc = x < lo ? lo : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  vf t = xc * 1.44269504088896341f + magic;
  vf n = t - magic;
  vf r = xc - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // ln2 split in two for exactness
  vf p = splat(1.0f / 720) * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(vf));
  vf y = p * scale;
  return x < lo ? splat(0.0f) : y;
}

constexpr int kP = 2 * kW;  // positions per packed key panel; score rows are padded to a multiple of it

struct Dims {
  int64_t R, Q, H, D, S;
  int64_t hi;  // positions [0, hi) hold every position some query may see
  int64_t ld;  // score-row stride: hi rounded up to kP (the padding gets probability 0)
};

// Few queries: scores accumulate over key rows streamed in order, 8 rows at a time, sc[i][s] (+)= sum_j
// q[i][d0+j] * k[d0+j][s] (scores stay in L1; the keys are read once, no copy). With more queries every key is
// reused enough that the packed panels below win.
template <int ND>
void ScoreRows(const float* const* qrows, int64_t Q, int64_t d0, const float* k, int64_t S, int64_t hi, float* sc,
               int64_t ld) {
  int64_t s0 = 0;
  for (; s0 + kW <= hi; s0 += kW) {
    vf kv[ND];
    for (int j = 0; j < ND; ++j) kv[j] = load(k + (d0 + j) * S + s0);
    for (int64_t i = 0; i < Q; ++i) {
      float* row = sc + i * ld + s0;
      vf a = d0 == 0 ? vf{} : load(row);
      for (int j = 0; j < ND; ++j) a += qrows[i][d0 + j] * kv[j];
      store(row, a);
    }
  }
  for (; s0 < ld; ++s0) {  // the last partial vector, and zeros on the padding up to ld
    for (int64_t i = 0; i < Q; ++i) {
      float a = d0 == 0 ? 0.f : sc[i * ld + s0];
      if (s0 < hi) {
        for (int j = 0; j < ND; ++j) a += qrows[i][d0 + j] * k[(d0 + j) * S + s0];
      }
      sc[i * ld + s0] = a;
    }
  }
}

void ScoresStreamed(const float* const* qrows, int64_t Q, const float* k, int64_t D, int64_t S, int64_t hi, float* sc,
                    int64_t ld) {
  int64_t d0 = 0;
  for (; d0 + 8 <= D; d0 += 8) ScoreRows<8>(qrows, Q, d0, k, S, hi, sc, ld);
  for (; d0 < D; ++d0) ScoreRows<1>(qrows, Q, d0, k, S, hi, sc, ld);
}

// Keys of one (row, head) pair, positions [0, hi), copied into panels of kP positions: panel[p][d][0:kP]. The copy
// reads every key row in order (prefetch-friendly); the products then read each panel contiguously from L1/L2.
// Reading the 64 rows side by side instead (one 16-position tile of each) was 2-3x slower: more streams than the
// hardware prefetcher follows.
constexpr int64_t kStreamedQueries = 4;  // up to this many queries per step: ScoresStreamed, else packed panels

void PackKeys(const float* k, int64_t D, int64_t S, int64_t hi, float* panels) {
  const int64_t np = (hi + kP - 1) / kP;
  for (int64_t d = 0; d < D; ++d) {
    const float* row = k + d * S;
    for (int64_t p = 0; p < np; ++p) {
      float* dst = panels + (p * D + d) * kP;
      const int64_t s0 = p * kP, w = std::min<int64_t>(kP, hi - s0);
      if (w == kP) {
        store(dst, load(row + s0));
        store(dst + kW, load(row + s0 + kW));
      } else {
        for (int64_t j = 0; j < kP; ++j) dst[j] = j < w ? row[s0 + j] : 0.f;
      }
    }
  }
}

// sc[i][p*kP .. +kP] = sum_d q[i][d] * panel[d][:] for NQ <= 8 queries: 2 x NQ accumulators in registers, and for
// few queries NS independent partial sums over d, so there are enough independent FMA chains to hide their latency.
template <int NQ>
void ScorePanel(const float* const* qrows, const float* panel, int64_t D, float* const* out) {
  constexpr int NS = NQ >= 4 ? 1 : (NQ == 1 ? 4 : 2);
  vf a0[NS][NQ] = {}, a1[NS][NQ] = {};
  int64_t d = 0;
  for (; d + NS <= D; d += NS) {
    for (int u = 0; u < NS; ++u) {
      vf k0 = load(panel + (d + u) * kP), k1 = load(panel + (d + u) * kP + kW);
      for (int i = 0; i < NQ; ++i) {
        a0[u][i] += qrows[i][d + u] * k0;
        a1[u][i] += qrows[i][d + u] * k1;
      }
    }
  }
  for (; d < D; ++d) {
    vf k0 = load(panel + d * kP), k1 = load(panel + d * kP + kW);
    for (int i = 0; i < NQ; ++i) {
      a0[0][i] += qrows[i][d] * k0;
      a1[0][i] += qrows[i][d] * k1;
    }
  }
  for (int i = 0; i < NQ; ++i) {
    for (int u = 1; u < NS; ++u) {
      a0[0][i] += a0[u][i];
      a1[0][i] += a1[u][i];
    }
    store(out[i], a0[0][i]);
    store(out[i] + kW, a1[0][i]);
  }
}

// Scores of Q queries against keys [0, hi): sc rows of ld >= round_up(hi, kP) floats.
void Scores(const float* const* qrows, int64_t Q, const float* panels, int64_t D, int64_t hi, float* sc, int64_t ld) {
  const int64_t np = (hi + kP - 1) / kP;
  for (int64_t p = 0; p < np; ++p) {
    const float* panel = panels + p * D * kP;
    for (int64_t q0 = 0; q0 < Q; q0 += 8) {
      const int nq = static_cast<int>(std::min<int64_t>(8, Q - q0));
      float* out[8];
      for (int i = 0; i < nq; ++i) out[i] = sc + (q0 + i) * ld + p * kP;
      const float* const* qr = qrows + q0;
      switch (nq) {
        case 1: ScorePanel<1>(qr, panel, D, out); break;
        case 2: ScorePanel<2>(qr, panel, D, out); break;
        case 3: ScorePanel<3>(qr, panel, D, out); break;
        case 4: ScorePanel<4>(qr, panel, D, out); break;
        case 5: ScorePanel<5>(qr, panel, D, out); break;
        case 6: ScorePanel<6>(qr, panel, D, out); break;
        case 7: ScorePanel<7>(qr, panel, D, out); break;
        default: ScorePanel<8>(qr, panel, D, out); break;
      }
    }
  }
}

// out[i][j] = sum_s p[i][s] * v[j][s] for NQ <= 4 queries and ND value rows (16 accumulators at 4 x 4).
template <int NQ, int ND>
void ValueBlock(const float* const* prow, const float* v, int64_t S, int64_t hi, float* const* out,
                bool prefetch_next) {
  vf acc[NQ][ND] = {};
  int64_t s0 = 0;
  for (; s0 + kW <= hi; s0 += kW) {
    vf pv[NQ];
    for (int i = 0; i < NQ; ++i) pv[i] = load(prow[i] + s0);
    if (prefetch_next) {
      // The next 4 value rows, while these are still being used: overlaps their memory reads with this block's FMAs.
      for (int j = 0; j < 4; ++j) __builtin_prefetch(v + (ND + j) * S + s0);
    }
    for (int j = 0; j < ND; ++j) {
      vf vv = load(v + j * S + s0);
      for (int i = 0; i < NQ; ++i) acc[i][j] += pv[i] * vv;
    }
  }
  if (s0 < hi) {
    // The last partial vector: value rows copied zero-padded (the probability rows are padded with zeros already).
    vf pv[NQ];
    for (int i = 0; i < NQ; ++i) pv[i] = load(prow[i] + s0);
    for (int j = 0; j < ND; ++j) {
      float tail[kW] = {};
      std::memcpy(tail, v + j * S + s0, static_cast<size_t>(hi - s0) * sizeof(float));
      vf vv = load(tail);
      for (int i = 0; i < NQ; ++i) acc[i][j] += pv[i] * vv;
    }
  }
  for (int i = 0; i < NQ; ++i) {
    for (int j = 0; j < ND; ++j) out[i][j] = hsum(acc[i][j]);
  }
}

template <int NQ>
void ValueRows(const float* const* prow, int64_t q0, const float* v, int64_t S, int64_t hi, float* acc, int64_t D,
               int64_t d0, int nd) {
  const float* p[NQ];
  float* o[NQ];
  for (int i = 0; i < NQ; ++i) {
    p[i] = prow[q0 + i];
    o[i] = acc + (q0 + i) * D + d0;
  }
  if (nd == 4) return ValueBlock<NQ, 4>(p, v + d0 * S, S, hi, o, q0 == 0 && d0 + 8 <= D);
  for (int j = 0; j < nd; ++j) {
    for (int i = 0; i < NQ; ++i) o[i] = acc + (q0 + i) * D + d0 + j;
    ValueBlock<NQ, 1>(p, v + (d0 + j) * S, S, hi, o, false);
  }
}

// acc[i][d] = sum_s p[i][s] * v[d][s]: 4 value rows at a time (they stay in L1 while every query block reads them).
void Values(const float* const* prow, int64_t Q, const float* v, int64_t D, int64_t S, int64_t hi, float* acc) {
  for (int64_t d0 = 0; d0 < D; d0 += 4) {
    const int nd = static_cast<int>(std::min<int64_t>(4, D - d0));
    int64_t q0 = 0;
    for (; q0 + 4 <= Q; q0 += 4) ValueRows<4>(prow, q0, v, S, hi, acc, D, d0, nd);
    switch (Q - q0) {
      case 3: ValueRows<3>(prow, q0, v, S, hi, acc, D, d0, nd); break;
      case 2: ValueRows<2>(prow, q0, v, S, hi, acc, D, d0, nd); break;
      case 1: ValueRows<1>(prow, q0, v, S, hi, acc, D, d0, nd); break;
      default: break;
    }
  }
}

// The mask (Q, S) as an additive bias (Q, ld): 0 where visible, float32's lowest elsewhere (also on the padding past
// hi, so padded positions get probability 0).
std::vector<float> MaskBias(const bool* mask, const Dims& dm) {
  std::vector<float> bias(static_cast<size_t>(dm.Q * dm.ld), std::numeric_limits<float>::lowest());
  for (int64_t i = 0; i < dm.Q; ++i) {
    for (int64_t s = 0; s < dm.hi; ++s) {
      if (mask[i * dm.S + s]) bias[i * dm.ld + s] = 0.f;
    }
  }
  return bias;
}

// One (row, head) pair: all Q queries of this step against the cache. bias: (Q, ld), see MaskBias.
void AttendPair(const Dims& dm, int64_t r, int64_t h, const float* q, const float* k, const float* v,
                const float* bias, float* out, std::vector<float>& scratch) {
  const int64_t D = dm.D, S = dm.S, Q = dm.Q, H = dm.H, hi = dm.hi, ld = dm.ld;
  scratch.resize(static_cast<size_t>(Q * ld + Q * D + ld * D));
  float* scores = scratch.data();
  float* acc = scores + Q * ld;
  float* panels = acc + Q * D;
  const float* kp = k + (r * H + h) * D * S;
  const float* vp = v + (r * H + h) * D * S;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float lowest = std::numeric_limits<float>::lowest();

  std::vector<const float*> qrows(static_cast<size_t>(Q));
  for (int64_t i = 0; i < Q; ++i) qrows[i] = q + ((r * Q + i) * H + h) * D;
  if (Q <= kStreamedQueries) {
    ScoresStreamed(qrows.data(), Q, kp, D, S, hi, scores, ld);
  } else {
    PackKeys(kp, D, S, hi, panels);
    Scores(qrows.data(), Q, panels, D, hi, scores, ld);
  }
  // Masked softmax, row by row (probabilities left unnormalised; the sum divides the output). bias is 0 where the
  // query may look and float32's lowest value where not: x * scale + bias equals decode.layers' masked scores (at
  // hidden positions to within rounding of that lowest value, whose exp is 0 all the same).
  std::vector<float> inv_sum(static_cast<size_t>(Q));
  for (int64_t i = 0; i < Q; ++i) {
    float* row = scores + i * ld;
    const float* b = bias + i * ld;
    vf mx = splat(lowest);
    for (int64_t s0 = 0; s0 < ld; s0 += kW) {
      vf x = load(row + s0) * scale + load(b + s0);
      store(row + s0, x);
      mx = mx > x ? mx : x;
    }
    float mxs = lowest;
    for (int j = 0; j < kW; ++j) mxs = std::max(mxs, mx[j]);
    vf sum = {};
    for (int64_t s0 = 0; s0 < ld; s0 += kW) {
      vf e = exp_nonpositive(load(row + s0) - mxs);
      store(row + s0, e);
      sum += e;
    }
    inv_sum[i] = 1.0f / hsum(sum);
  }
  std::vector<const float*> prows(static_cast<size_t>(Q));
  for (int64_t i = 0; i < Q; ++i) prows[i] = scores + i * ld;
  Values(prows.data(), Q, vp, D, S, hi, acc);
  for (int64_t i = 0; i < Q; ++i) {
    float* o = out + ((r * Q + i) * H + h) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[i * D + d] * inv_sum[i];
  }
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                  ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2) {
    return ffi::Error::InvalidArgument("par_decode_attention: expected q (R,Q,H,D), k/v (R,H,D,S), mask (Q,S)");
  }
  Dims dm{qd[0], qd[1], qd[2], qd[3], kd[3], 0, 0};
  if (kd[0] != dm.R || kd[1] != dm.H || kd[2] != dm.D || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] ||
      vd[3] != kd[3] || md[0] != dm.Q || md[1] != dm.S) {
    return ffi::Error::InvalidArgument("par_decode_attention: q, k, v and mask shapes do not agree");
  }
  const bool* m = mask.typed_data();
  // Only positions some query may see are read: the cache past the current step is still zeros.
  for (int64_t i = 0; i < dm.Q; ++i) {
    for (int64_t s = dm.S - 1; s >= dm.hi; --s) {
      if (m[i * dm.S + s]) {
        dm.hi = s + 1;
        break;
      }
    }
  }
  dm.ld = (dm.hi + kP - 1) / kP * kP;
  const std::vector<float> bias = MaskBias(m, dm);
  // Tasks are (row, head) pairs claimed from a shared counter by this thread and by helpers on XLA's pool. The
  // caller never waits for a helper that has not started (on a VM a helper's core may be descheduled for
  // milliseconds): it works through the tasks itself and then waits only for tasks a helper has claimed. A helper
  // that starts after the work is gone finds the counter exhausted and touches nothing but the shared state.
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  float* op = out->typed_data();
  const float* bp = bias.data();
  const int64_t tasks = dm.R * dm.H;
  auto work = [shared, dm, tasks, qp, kp, vp, bp, op] {
    std::vector<float> scratch;
    for (int64_t t; (t = shared->next.fetch_add(1)) < tasks;) {
      AttendPair(dm, t / dm.H, t % dm.H, qp, kp, vp, bp, op, scratch);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(tasks, pool.num_threads()) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  while (shared->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ParDecodeAttention, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
