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


# (label, module, x, y) boxes and the data that flows between them, for docs/architecture.md.
_BOXES = {
    "images": ("images + labels", "data/sources.py", 0.08, 0.80),
    "tok_train": ("VQ tokenizer training", "tokenizer/train.py", 0.08, 0.50),
    "tokenizer": ("VQ tokenizer", "tokenizer/vq.py", 0.36, 0.50),
    "extract": ("code extraction", "data/extract.py", 0.36, 0.80),
    "records": ("token codes (ArrayRecord)", "data/pipeline.py (grain)", 0.64, 0.80),
    "train": ("sharded train loop", "training/train.py", 0.92, 0.80),
    "model": ("ParTransformer", "model/ + ordering.py", 0.92, 0.50),
    "sampler": ("jitted sampler", "sampling/sampler.py", 0.64, 0.50),
    "eval": ("FID / IS / P&R", "evaluation/", 0.36, 0.18),
    "convert": ("released .pt weights", "conversion/", 0.92, 0.18),
    "out": ("PNG grids, .npz,\nTensorBoard", "CLU writers", 0.64, 0.18),
}
_EDGES = [
    ("images", "tok_train", "pixels"), ("tok_train", "tokenizer", "checkpoint"), ("images", "extract", "ten-crop views"),
    ("tokenizer", "extract", "encode"), ("extract", "records", "codes"), ("records", "train", "batches"),
    ("train", "model", "params (orbax)"), ("convert", "model", "params"), ("model", "sampler", "KV cache steps"),
    ("sampler", "tokenizer", "tokens -> decode"), ("tokenizer", "eval", "images"), ("eval", "out", "metrics"),
    ("sampler", "out", "samples"),
]


def plot_architecture(path: str) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(13, 6.5))
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(0.02, 0.95)
    ax.axis("off")
    for name, (label, module, x, y) in _BOXES.items():
        ax.text(x, y, f"{label}\n{module}", ha="center", va="center", fontsize=9.5,
                bbox=dict(boxstyle="round,pad=0.5", fc="#e8f0fe" if name != "model" else "#fde8c8", ec="#335"))
    for a, b, label in _EDGES:
        (xa, ya), (xb, yb) = _BOXES[a][2:], _BOXES[b][2:]
        shrink = 70 if ya == yb else 24  # boxes are wide: horizontal arrows stop further out
        ax.annotate("", xy=(xb, yb), xytext=(xa, ya),
                    arrowprops=dict(arrowstyle="-|>", color="#445", lw=1.3, shrinkA=shrink, shrinkB=shrink))
        ax.text((xa + xb) / 2, (ya + yb) / 2 + 0.025, label, ha="center", fontsize=8, color="#a33")
    ax.set_title("par_jax: modules (par_jax/...) and the data flowing between them", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def define_flags(fv: flags.FlagValues, argv) -> None:
    del argv
    flags.DEFINE_list("grid", ["16", "16"], "Token grid, H,W.", flag_values=fv)
    flags.DEFINE_list("n", ["1", "4", "16"], "Tokens per parallel step, one panel each.", flag_values=fv)
    flags.DEFINE_string("out", "docs/images/orders.png", "The orders picture.", flag_values=fv)
    flags.DEFINE_string("architecture", "", "Also draw the module diagram to this PNG.", flag_values=fv)


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
    if f.architecture:
        plot_architecture(f.architecture)
        print(f"wrote {f.architecture}")
    plot_orders(f.out, grid, ns)
    print(f"wrote {f.out}")


if __name__ == "__main__":
    config_args.run(main)
