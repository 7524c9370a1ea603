// Attention of a decoding step over the KV cache, for XLA:CPU (float32), registered through jax.ffi.
//
// Why a kernel: XLA:CPU runs this step's attention (a few queries per head against a cache of a few hundred
// positions) as batched small matrix products on one thread, at about 3 GB/s of cache read, while the weight
// matmuls around it use every core; at 16 queries per step it was ~25% of the sampler's time (docs/benchmarks.md).
// Here each (row, head) pair is one task, spread over XLA's intra-op thread pool. Up to kStreamedQueries queries
// (n = 1 and 4) the key rows are streamed past score rows held in L1; with more queries, up to 16 of them share one
// vector (one lane per query), so scores, softmax and the value product are whole-vector FMAs on the cache read in
// place (no packing, no horizontal sums), with software prefetch a block ahead because 64 strided rows are more
// streams than the hardware prefetcher follows.
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

struct Dims {
  int64_t R, Q, H, D, S;
  int64_t hi;  // positions [0, hi) hold every position some query may see
  int64_t ld;  // score-row stride of the streamed path: hi rounded up to kW (the padding gets probability 0)
};

// Few queries: scores accumulate over key rows streamed in order, 8 rows at a time, sc[i][s] (+)= sum_j
// q[i][d0+j] * k[d0+j][s] (scores stay in L1; the keys are read once, no copy). With more queries the lanes path
// below does more FMAs per load.
template <int ND>
void ScoreRows(const float* const* qrows, int64_t Q, int64_t d0, const float* k, int64_t S, int64_t hi, float* sc,
               int64_t ld) {
  int64_t s0 = 0;
  for (; s0 + kW <= hi; s0 += kW) {
    vf kv[ND];
    // 8 rows read side by side: prefetched 8 lines ahead, which took 12 layers x 24 pairs x 600 positions at 4
    // queries from ~9 ms to ~7.7 ms on one core with the cache in DRAM.
    for (int j = 0; j < ND; ++j) __builtin_prefetch(k + (d0 + j) * S + s0 + 8 * kW);
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

constexpr int64_t kStreamedQueries = 4;  // up to this many queries per step: the streamed path, else lanes

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

// acc[i][d] = sum_s p[i][s] * v[d][s] for the NQ <= kStreamedQueries queries: 4 value rows at a time (the next 4
// prefetched while these are read), rows past a multiple of 4 one by one.
template <int NQ>
void ValueRows(const float* const* prow, const float* v, int64_t D, int64_t S, int64_t hi, float* acc) {
  for (int64_t d0 = 0; d0 < D; d0 += 4) {
    const int64_t nd = std::min<int64_t>(4, D - d0);
    float* o[NQ];
    for (int i = 0; i < NQ; ++i) o[i] = acc + i * D + d0;
    if (nd == 4) {
      ValueBlock<NQ, 4>(prow, v + d0 * S, S, hi, o, d0 + 8 <= D);
      continue;
    }
    for (int64_t j = 0; j < nd; ++j) {
      for (int i = 0; i < NQ; ++i) o[i] = acc + i * D + d0 + j;
      ValueBlock<NQ, 1>(prow, v + (d0 + j) * S, S, hi, o, false);
    }
  }
}

void Values(const float* const* prow, int64_t Q, const float* v, int64_t D, int64_t S, int64_t hi, float* acc) {
  switch (Q) {
    case 1: return ValueRows<1>(prow, v, D, S, hi, acc);
    case 2: return ValueRows<2>(prow, v, D, S, hi, acc);
    case 3: return ValueRows<3>(prow, v, D, S, hi, acc);
    default: return ValueRows<4>(prow, v, D, S, hi, acc);
  }
}

// Streamed path (Q <= kStreamedQueries), one (row, head) pair. bias: (Q, ld), see MaskBias.
void AttendStreamed(const Dims& dm, const float* const* qrows, const float* kp, const float* vp, const float* bias,
                    float* const* orows, float* scratch) {
  const int64_t D = dm.D, S = dm.S, Q = dm.Q, hi = dm.hi, ld = dm.ld;
  float* scores = scratch;       // (Q, ld)
  float* acc = scores + Q * ld;  // (Q, D)
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float lowest = std::numeric_limits<float>::lowest();
  ScoresStreamed(qrows, Q, kp, D, S, hi, scores, ld);
  // Masked softmax, row by row (probabilities left unnormalised; the sum divides the output). bias is 0 where the
  // query may look and float32's lowest value where not: x * scale + bias equals decode.layers' masked scores (at
  // hidden positions to within rounding of that lowest value, whose exp is 0 all the same).
  float inv_sum[kStreamedQueries];
  const float* prows[kStreamedQueries];
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
    prows[i] = row;
  }
  Values(prows, Q, vp, D, S, hi, acc);
  for (int64_t i = 0; i < Q; ++i) {
    for (int64_t d = 0; d < D; ++d) orows[i][d] = acc[i * D + d] * inv_sum[i];
  }
}

// Lanes path (Q > kStreamedQueries): up to kW queries of one (row, head) pair share one vector, one lane each, so
// the scores of a position are one vector, the softmax runs down the positions with no horizontal reductions, and
// both products are outer-product FMAs with the cache values broadcast straight from the cache rows (read in place:
// the old packed-panel copy of the keys cost as much as the score products). Each loaded vector feeds 16-24 FMAs.
// Measured on one core of the 2-core Xeon with the cache in L2: scores ~160 GFLOP/s, values ~150 GFLOP/s.
//
// The 64 key (value) rows are read side by side, a few positions of each at a time: more streams than the hardware
// prefetcher tracks, so each row is prefetched kPrefetchK (kPrefetchV) floats ahead. With the cache in DRAM, as in
// the sampler (the weights pass through between two uses of a layer's cache), this took one core from 16 ms to 9 ms
// for 12 layers x 24 pairs x 600 positions.
constexpr int64_t kPrefetchK = 24 + 24;  // one block of keys ahead
constexpr int64_t kPrefetchV = 64;
constexpr int kU = 8;                    // positions per round of the value product

// st[s0 + j] = (qt^T k[:, s0 + j]) + biast[s0 + j] for NB positions (qt is (D, kW): the queries times 1/sqrt(D),
// transposed); mx keeps the running per-lane max.
template <int NB>
inline void LaneScores(const float* qt, const float* k, int64_t D, int64_t S, int64_t s0, const float* biast,
                       float* st, vf& mx) {
  vf acc[NB] = {};
  const float* kr = k + s0;
  for (int64_t d = 0; d < D; ++d, kr += S) {
    __builtin_prefetch(kr + kPrefetchK);
    __builtin_prefetch(kr + kPrefetchK + kW);
    const vf qv = load(qt + d * kW);
#pragma GCC unroll 32  // without it GCC keeps the accumulators on the stack (2.6x slower)
    for (int j = 0; j < NB; ++j) acc[j] += kr[j] * qv;
  }
#pragma GCC unroll 32
  for (int j = 0; j < NB; ++j) {
    const vf x = acc[j] + load(biast + (s0 + j) * kW);
    store(st + (s0 + j) * kW, x);
    mx = mx > x ? mx : x;
  }
}

// acct[d0 + j] = sum_s pt[s] * v[d0 + j][s] for DB value rows: DB accumulators and kU probability vectors in
// registers, one pointer walking down the rows (so every broadcast is [row + constant]).
template <int DB>
inline void LaneValues(const float* pt, const float* v, int64_t S, int64_t hi, int64_t d0, float* acct) {
  vf acc[DB] = {};
  const float* vr = v + d0 * S;
  int64_t s0 = 0;
  for (; s0 + kU <= hi; s0 += kU) {
    vf pv[kU];
    for (int u = 0; u < kU; ++u) pv[u] = load(pt + (s0 + u) * kW);
    const float* row = vr + s0;
#pragma GCC unroll 32
    for (int j = 0; j < DB; ++j, row += S) {
      __builtin_prefetch(row + kPrefetchV);
      for (int u = 0; u < kU; ++u) acc[j] += row[u] * pv[u];
    }
  }
  for (; s0 < hi; ++s0) {
    const vf pv = load(pt + s0 * kW);
#pragma GCC unroll 32
    for (int j = 0; j < DB; ++j) acc[j] += vr[j * S + s0] * pv;
  }
  for (int j = 0; j < DB; ++j) store(acct + (d0 + j) * kW, acc[j]);
}

// nq <= kW queries of one (row, head) pair. biast: (hi, kW), this chunk's lanes of LaneBias.
void AttendLanes(const Dims& dm, const float* const* qrows, int nq, const float* kp, const float* vp,
                 const float* biast, float* const* orows, float* scratch) {
  const int64_t D = dm.D, S = dm.S, hi = dm.hi;
  float* qt = scratch;        // (D, kW)
  float* acct = qt + D * kW;  // (D, kW)
  float* st = acct + D * kW;  // (hi, kW): scores, then unnormalised probabilities
  // The scale goes on the queries (decode.layers scales the scores: the same up to rounding; exact for D = 64).
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t d = 0; d < D; ++d) {
    for (int i = 0; i < kW; ++i) qt[d * kW + i] = i < nq ? qrows[i][d] * scale : 0.f;
  }
  vf mx = splat(std::numeric_limits<float>::lowest());
  int64_t s0 = 0;
  for (; s0 + 24 <= hi; s0 += 24) LaneScores<24>(qt, kp, D, S, s0, biast, st, mx);
  for (; s0 + 8 <= hi; s0 += 8) LaneScores<8>(qt, kp, D, S, s0, biast, st, mx);
  for (; s0 < hi; ++s0) LaneScores<1>(qt, kp, D, S, s0, biast, st, mx);
  vf sum = {};
  for (int64_t s = 0; s < hi; ++s) {
    const vf e = exp_nonpositive(load(st + s * kW) - mx);
    store(st + s * kW, e);
    sum += e;
  }
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) LaneValues<16>(st, vp, S, hi, d0, acct);
  for (; d0 + 4 <= D; d0 += 4) LaneValues<4>(st, vp, S, hi, d0, acct);
  for (; d0 < D; ++d0) LaneValues<1>(st, vp, S, hi, d0, acct);
  const vf inv = splat(1.0f) / sum;
  for (int64_t d = 0; d < D; ++d) {
    const vf o = load(acct + d * kW) * inv;
    for (int i = 0; i < nq; ++i) orows[i][d] = o[i];
  }
}

// The mask as an additive bias: 0 where visible, float32's lowest elsewhere. Streamed path: (Q, ld), lowest also on
// the padding past hi (padded positions get probability 0). Lanes path: (chunks of kW queries, hi, kW), with 0 in
// the lanes past Q (their scores are 0 and their outputs are never written).
std::vector<float> MaskBias(const bool* mask, const Dims& dm) {
  const float lowest = std::numeric_limits<float>::lowest();
  if (dm.Q <= kStreamedQueries) {
    std::vector<float> bias(static_cast<size_t>(dm.Q * dm.ld), lowest);
    for (int64_t i = 0; i < dm.Q; ++i) {
      for (int64_t s = 0; s < dm.hi; ++s) {
        if (mask[i * dm.S + s]) bias[i * dm.ld + s] = 0.f;
      }
    }
    return bias;
  }
  const int64_t chunks = (dm.Q + kW - 1) / kW;
  std::vector<float> bias(static_cast<size_t>(chunks * dm.hi * kW), 0.f);
  for (int64_t i = 0; i < dm.Q; ++i) {
    float* b = bias.data() + (i / kW) * dm.hi * kW + i % kW;
    for (int64_t s = 0; s < dm.hi; ++s) {
      if (!mask[i * dm.S + s]) b[s * kW] = lowest;
    }
  }
  return bias;
}

// One (row, head) pair: all Q queries of this step against the cache. bias: see MaskBias.
void AttendPair(const Dims& dm, int64_t r, int64_t h, const float* q, const float* k, const float* v,
                const float* bias, float* out, std::vector<float>& scratch) {
  const int64_t D = dm.D, Q = dm.Q, H = dm.H;
  const float* kp = k + (r * H + h) * D * dm.S;
  const float* vp = v + (r * H + h) * D * dm.S;
  const float* qrows[kW];
  float* orows[kW];
  if (Q <= kStreamedQueries) {
    scratch.resize(static_cast<size_t>(Q * (dm.ld + D)));
    for (int64_t i = 0; i < Q; ++i) {
      qrows[i] = q + ((r * Q + i) * H + h) * D;
      orows[i] = out + ((r * Q + i) * H + h) * D;
    }
    return AttendStreamed(dm, qrows, kp, vp, bias, orows, scratch.data());
  }
  scratch.resize(static_cast<size_t>((2 * D + dm.hi) * kW));
  for (int64_t q0 = 0; q0 < Q; q0 += kW) {
    const int nq = static_cast<int>(std::min<int64_t>(kW, Q - q0));
    for (int i = 0; i < nq; ++i) {
      qrows[i] = q + ((r * Q + q0 + i) * H + h) * D;
      orows[i] = out + ((r * Q + q0 + i) * H + h) * D;
    }
    AttendLanes(dm, qrows, nq, kp, vp, bias + (q0 / kW) * dm.hi * kW, orows, scratch.data());
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
  dm.ld = (dm.hi + kW - 1) / kW * kW;
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
