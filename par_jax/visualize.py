"""Pictures of token orders: the step at which each grid cell is generated.

    python -m par_jax.visualize --grid=16,16 --n=4,16 --out=docs/images/orders.png
"""

import argparse

import numpy as np

from par_jax import ordering


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="16,16")
    p.add_argument("--n", default="1,4,16")
    p.add_argument("--out", default="docs/images/orders.png")
    a = p.parse_args()
    plot_orders(a.out, tuple(int(x) for x in a.grid.split(",")), tuple(int(x) for x in a.n.split(",")))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
