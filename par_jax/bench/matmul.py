"""The CPU decode matmul kernel (sampling/cpu_matmul.cc) against NumPy's BLAS on the sampler's weight shapes.

    python -m par_jax.bench.matmul --rows=2,8,32,512,2048 --json=/tmp/matmul.json
    python -m par_jax.bench.matmul --sources=/tmp/old.cc,/tmp/new.cc   # versions of the kernel source, A/B

Every round times every variant once on every shape (interleaved, so a shared machine's drift hits all alike): the
kernels in an order that rotates, then NumPy's `x @ w`, then a pause (BLAS's worker threads spin a while after a call,
taking CPU from whatever runs next). The table gives each variant's median GFLOP/s and the median over rounds of its
per-round time ratio to NumPy's (>1: faster than BLAS); with several sources, also each one's speed over the first's:
the median of per-round ratios, the ratio of the best times, and the median ratio of this process's CPU seconds per
call (which a loaded machine disturbs least: time spent descheduled does not count). Few rows are bandwidth bound,
so those shapes rotate through enough weight copies (64 MB) to miss the last-level cache as the sampler's weights do;
many rows reuse one copy.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from par_jax.sampling import cpu_attention, cpu_matmul

# PAR-B's matrices (K, N): wqkv, wo, w1 | w3 (dim -> mlp_hidden), w2 (mlp_hidden -> dim).
SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768))

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["2", "8", "32", "512", "2048"], "Row counts M.")
flags.DEFINE_list("shapes", [f"{k}x{n}" for k, n in SHAPES], "Weight shapes KxN.")
flags.DEFINE_list("sources", [], "Kernel sources to compare (default: the installed cpu_matmul.cc).")
flags.DEFINE_integer("rounds", 15, "Interleaved rounds.")
flags.DEFINE_float("seconds", 0.05, "Least time per measurement (calls repeated within it).")
flags.DEFINE_string("json", None, "Write the rows here.")


def _kernel(source: Path, index: int):
    target = f"{cpu_matmul.TARGET}_bench{index}"
    reason = cpu_attention.load_kernel(source, "ParDecodeMatmul", target)
    if reason is not None:
        raise RuntimeError(reason)
    return jax.jit(lambda x, w: jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct((x.shape[0], w.shape[0] * cpu_matmul.PANEL), jnp.float32))(x, w))


def _per_call(fn, copies: int, reps: int, cpu: dict | None = None, name: str = "") -> float:
    """Wall seconds per call; with `cpu`, appends this process's CPU seconds per call (every thread) to cpu[name]."""
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(reps):
        out = fn(i % copies)
    jax.block_until_ready(out)
    if cpu is not None:
        cpu[name].append((time.process_time() - start_cpu) / reps)
    return (time.perf_counter() - start) / reps


def main(argv):
    del argv
    sources = [Path(s) for s in FLAGS.sources] or [Path(cpu_matmul.__file__).with_name("cpu_matmul.cc")]
    names = [s.name if len(sources) == 1 or len({s.name for s in sources}) == len(sources) else str(s)
             for s in sources]
    kernels = [_kernel(s, i) for i, s in enumerate(sources)]
    rng = np.random.default_rng(0)
    rows = []
    cases = []
    for shape in FLAGS.shapes:
        k, n = (int(v) for v in shape.split("x"))
        w_bytes = 4 * k * n
        w_np = rng.standard_normal((k, n), np.float32) / np.sqrt(k)
        for m in (int(r) for r in FLAGS.rows):
            copies = max(1, -(-(64 << 20) // w_bytes)) if m <= 32 else 1
            x_np = rng.standard_normal((m, k), np.float32)
            ws_np = [w_np * (1 + 1e-3 * c) for c in range(copies)]
            ws = [cpu_matmul.pack(jnp.asarray(w)) for w in ws_np]
            x = jnp.asarray(x_np)
            want = x_np.astype(np.float64) @ w_np.astype(np.float64)
            fns = {"numpy": lambda i, x_np=x_np, ws_np=ws_np: x_np @ ws_np[i]}
            for name, kern in zip(names, kernels):
                got = np.asarray(kern(x, ws[0]))[:, :n]
                err = np.abs(got - want).max() / np.abs(want).max()
                assert err < 1e-5, f"{name} at M={m} K={k} N={n}: relative error {err:.2e}"
                fns[name] = lambda i, kern=kern, x=x, ws=ws: kern(x, ws[i])
            reps = {}
            for name, fn in fns.items():
                fn(0)
                once = _per_call(fn, copies, 3)
                reps[name] = max(3, int(FLAGS.seconds / once))
            cases.append(((m, k, n), copies, fns, reps))
    load_start = os.getloadavg()
    times = [{name: [] for name in fns} for _, _, fns, _ in cases]
    cpu_times = [{name: [] for name in fns} for _, _, fns, _ in cases]
    for r in range(FLAGS.rounds):
        for (shape, copies, fns, reps), t, c in zip(cases, times, cpu_times):
            # The kernels' order rotates every round; NumPy goes last, then a pause: BLAS's worker threads spin a
            # while after a call, taking CPU from whatever runs next.
            order = [name for name in fns if name != "numpy"]
            for name in order[r % len(order):] + order[:r % len(order)] + ["numpy"]:
                t[name].append(_per_call(fns[name], copies, reps[name], c, name))
            time.sleep(0.2)
    load_end = os.getloadavg()
    print(f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; {FLAGS.rounds} rounds")
    header = f"{'M':>5} {'K':>5} {'N':>5} {'numpy GF/s':>10}" + "".join(
        f" {name[:18]:>18} GF/s  vs np" for name in names)
    print(header)
    for ((m, k, n), copies, fns, _), t, c in zip(cases, times, cpu_times):
        flops = 2 * m * k * n
        row = {"rows": m, "k": k, "n": n, "weight_copies": copies,
               "numpy_gflops": flops / statistics.median(t["numpy"]) / 1e9, "kernels": {}}
        line = f"{m:>5} {k:>5} {n:>5} {row['numpy_gflops']:>10.1f}"
        for name in names:
            ratio = statistics.median(a / b for a, b in zip(t["numpy"], t[name]))
            gf = flops / statistics.median(t[name]) / 1e9
            row["kernels"][name] = {"gflops": gf, "vs_numpy": ratio}
            line += f" {gf:>23.1f} {ratio:>6.2f}"
        for name in names[1:]:
            ab = statistics.median(a / b for a, b in zip(t[names[0]], t[name]))
            best = min(t[names[0]]) / min(t[name])
            by_cpu = statistics.median(a / b for a, b in zip(c[names[0]], c[name]))
            row["kernels"][name]["speed_vs_first"] = {"median_ratio": ab, "best_ratio": best, "cpu_time_ratio": by_cpu}
            line += f"  {name[:10]}/first {ab:.3f} (best {best:.3f}, CPU {by_cpu:.3f})"
        print(line)
        rows.append(row)
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps({"load_start": load_start, "load_end": load_end,
                                                "rounds": FLAGS.rounds, "sources": names,
                                                "rows": rows}, indent=1))


if __name__ == "__main__":
    app.run(main)
