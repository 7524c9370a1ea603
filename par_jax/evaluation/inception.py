"""InceptionV3 as used for FID ("pt_inception-2015-12-05"), in Flax NNX: pool features, logits, spatial features.

This is the network of TensorFlow's 2015 Inception graph that the ADM evaluator runs, in the layout of the PyTorch
port used by pytorch-fid and torch-fidelity, so its weight file (`pt_inception-2015-12-05-6726825d.pth`) loads
key for key. It differs from a textbook InceptionV3 where the TF graph does:

- average pools in the mixed blocks ignore the zero padding (TF's `count_include_pad=False`);
- the last block (Mixed_7c) max-pools in its pool branch instead of average-pooling;
- 1008 output classes; the Inception Score uses logits *without* the bias (ADM multiplies the pool features by the
  softmax weights only; torch-fidelity's `logits_unbiased`), returned as `logits_unbiased`;
- input: any size of RGB in [0, 255], resized to 299x299 by TF1's bilinear resize (no half-pixel offset, unlike
  `jax.image.resize` or PyTorch), then (x - 128) / 128.

Outputs: `pool` (B, 2048) for FID and precision/recall, `logits` (B, 1008) with bias, `logits_unbiased` (B, 1008)
for IS, and `spatial` (B, 2023) for sFID: ADM's `mixed_6/conv` tensor (the 1x1 branch of Mixed_6d after ReLU,
17x17x192), first 7 channels, flattened in (row, col, channel) order.

Module and attribute names are the PyTorch ones (`Conv2d_1a_3x3`, `Mixed_5b.branch1x1`, ...) on purpose: the
weight file maps onto them one to one (see `load`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from par_jax.evaluation import torch_weights

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of the 192 channels: 17 * 17 * 7 = 2023 features
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE


# ----------------------------------------------------------------------------------------------------------------
# TF1 resize
# ----------------------------------------------------------------------------------------------------------------

def tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) interpolation matrix of TF1's ResizeBilinear(align_corners=False, half_pixel_centers=False).

    Source coordinate of output pixel i is i * in/out (no half-pixel offset), neighbours floor and floor + 1
    (clamped to the last pixel). This is what the 2015 Inception graph does to its input.
    """
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m.astype(np.float32)


def tf1_resize_bilinear(images, size: int):
    """(B, H, W, C) -> (B, size, size, C) with TF1's bilinear resize, as separable matrix products."""
    _, h, w, _ = images.shape
    rows, cols = jnp.asarray(tf1_bilinear_matrix(h, size)), jnp.asarray(tf1_bilinear_matrix(w, size))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", rows, images, precision=hi)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=hi)


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------

def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """Conv (no bias) + frozen BatchNorm (eps 1e-3) + ReLU: TF's conv unit, PyTorch's `BasicConv2d`."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(cin, cout, _pair(kernel), _pair(stride), padding=((ph, ph), (pw, pw)), use_bias=False,
                             precision=jax.lax.Precision.HIGHEST, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # TF averages over the window's valid pixels only.
    return nnx.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride: int, pad: int = 0):
    return nnx.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


def _cat(branches):
    return jnp.concatenate(branches, axis=-1)


class InceptionA(nnx.Module):  # Mixed_5b..5d (35x35)
    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        return _cat([self.branch1x1(x),
                     self.branch5x5_2(self.branch5x5_1(x)),
                     self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                     self.branch_pool(_avg_pool_3x3(x))])


class InceptionB(nnx.Module):  # Mixed_6a (35 -> 17)
    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        return _cat([self.branch3x3(x),
                     self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                     _max_pool(x, 2)])


class InceptionC(nnx.Module):  # Mixed_6b..6e (17x17), factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def branches(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_3x3(x))]

    def __call__(self, x):
        return _cat(self.branches(x))


class InceptionD(nnx.Module):  # Mixed_7a (17 -> 8)
    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return _cat([self.branch3x3_2(self.branch3x3_1(x)), b7, _max_pool(x, 2)])


class InceptionE(nnx.Module):  # Mixed_7b, 7c (8x8); `pool` is "avg" in 7b and "max" in 7c (the FID graph's quirk)
    def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _max_pool(x, 1, pad=1) if self.pool == "max" else _avg_pool_3x3(x)
        return _cat([self.branch1x1(x),
                     self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                     self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                     self.branch_pool(pooled)])


class InceptionV3(nnx.Module):
    """The FID Inception network. `__call__(images (B, H, W, 3) in [0, 255], uint8 or float) -> dict` of features.

    `input_size` is 299 for real use; tests may shrink it (>= 75) to run the same graph fast.
    """

    def __init__(self, *, rngs: nnx.Rngs, input_size: int = INPUT_SIZE):
        if input_size < 75:
            raise ValueError(f"InceptionV3 needs inputs of at least 75x75; got input_size={input_size}.")
        self.input_size = input_size
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
        self.fc = nnx.Linear(POOL_DIM, NUM_CLASSES, precision=jax.lax.Precision.HIGHEST, rngs=rngs)

    def __call__(self, images) -> dict[str, jax.Array]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionV3 takes RGB images (batch, height, width, 3) in [0, 255]; got shape "
                             f"{tuple(images.shape)} (replicate grey images to 3 channels first).")
        x = tf1_resize_bilinear(images.astype(jnp.float32), self.input_size)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool(x, 2)
        x = _max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][..., :SPATIAL_CHANNELS]
        x = self.Mixed_6e(_cat(branches))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = jnp.mean(x, axis=(1, 2))
        unbiased = jnp.matmul(pool, self.fc.kernel[...], precision=jax.lax.Precision.HIGHEST)
        return {"pool": pool, "logits": unbiased + self.fc.bias[...], "logits_unbiased": unbiased,
                "spatial": spatial.reshape(spatial.shape[0], -1)}


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------

def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    # Conv kernels (kh, kw, in, out) <- torch (out, in, kh, kw); linear (in, out) <- torch (out, in).
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def torch_state_shapes() -> dict[str, tuple[int, ...]]:
    """{PyTorch key: shape} that a weight file for this network must hold (computed abstractly, nothing allocated)."""
    return dict(_torch_state_shapes())


@functools.lru_cache(maxsize=1)
def _torch_state_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    return torch_weights.torch_shapes(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))), _torch_shape)


def _torch_shape(shape) -> tuple[int, ...]:
    return tuple(_to_torch_layout(np.empty(shape, np.uint8)).shape)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A flat {key: array} from a PyTorch `.pth`, a `.npz` or a `.safetensors` file with the PyTorch keys."""
    return torch_weights.read_state_dict(
        path, not_found=f"Inception weights not found: download {WEIGHTS_URL} on a machine with internet access and "
                        f"pass its path (--config.eval.inception_weights=...)",
        convert_hint="convert the file to .npz / .safetensors with the same keys on a machine that has it")


def load(path_or_state, *, input_size: int = INPUT_SIZE) -> InceptionV3:
    """The FID InceptionV3 with weights from its file (or an already-read {PyTorch key: array}).

    The network is built abstractly and filled from the file (no random initialisation: it would only be
    overwritten, and takes minutes on a CPU). Every parameter and batch statistic must be present with the PyTorch
    shape (`torch_weights.fill`).
    """
    return torch_weights.fill(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), input_size=input_size)),
                              path_or_state, torch_state_shapes(), _from_torch_layout, read=read_state_dict,
                              what=f"the FID InceptionV3 (is it {WEIGHTS_FILE}?)")
