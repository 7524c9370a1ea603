"""Pictures of token orders: the step at which each grid cell is generated.

    python -m par_jax.visualize --grid=16,16 --n=4,16 --out=docs/images/orders.png
"""

import numpy as np
from absl import flags

from par_jax import ordering
from par_jax.core import config_args


def plot_orders(path: str, grid_shape=(16, 16), ns=(1, 4, 16)) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(ns), figsize=(4.6 * len(ns), 4.9))
    for ax, n in zip(np.atleast_1d(axes), ns):
        spec = ordering.OrderSpec(tuple(grid_shape), n)
        steps = ordering.step_map(spec)
        ax.imshow(steps, cmap="viridis")
        h, w = steps.shape
        for r in range(h):
            for c in range(w):
                ax.text(c, r, str(steps[r, c]), ha="center", va="center", fontsize=5.5,
                        color="white" if steps[r, c] < steps.max() * 0.6 else "black")
        s = int(np.sqrt(n))
        for k in range(1, s):  # region borders
            ax.axhline(k * h / s - 0.5, color="red", lw=1.5)
            ax.axvline(k * w / s - 0.5, color="red", lw=1.5)
        name = "raster (LlamaGen)" if n == 1 else f"PAR-{n}x"
        ax.set_title(f"{name}: {spec.layout.num_steps} steps for {h * w} tokens")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Forward step at which each token is generated")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def define_flags(fv: flags.FlagValues, argv) -> None:
    del argv
    flags.DEFINE_list("grid", ["16", "16"], "Token grid, H,W.", flag_values=fv)
    flags.DEFINE_list("n", ["1", "4", "16"], "Tokens per parallel step, one panel each.", flag_values=fv)
    flags.DEFINE_string("out", "docs/images/orders.png", "The orders picture.", flag_values=fv)


def main(argv=None) -> None:
    f = config_args.parse_flags(argv, define_flags, doc=__doc__)
    try:
        grid, ns = tuple(int(x) for x in f.grid), tuple(int(x) for x in f.n)
    except ValueError:
        raise config_args.UsageError(f"--grid and --n take comma-separated integers, got --grid={','.join(f.grid)} "
                                     f"--n={','.join(f.n)}.") from None
    for n in ns:
        try:
            ordering.OrderSpec(grid, n)
        except ValueError as e:
            raise config_args.UsageError(f"--n={n}: {e}") from None
    plot_orders(f.out, grid, ns)
    print(f"wrote {f.out}")


if __name__ == "__main__":
    config_args.run(main)
