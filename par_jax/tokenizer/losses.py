"""Tokenizer training losses and statistics (PAR_SPEC section 8, the LlamaGen recipe).

  reconstruction   mean squared error (L2) in the [-1, 1] pixel space
  codebook/commit  from the quantizer (`vq.Quantized`): ||sg(z) - e||^2 and beta * ||z - sg(e)||^2
  perceptual       LPIPS with VGG16 features. Its weights cannot be downloaded here: they are read from a file
                   (`load_perceptual_weights`), and asking for the loss without the file is an error, never a
                   silent skip.
  adversarial      a PatchGAN discriminator with hinge losses, switched on from a start step
  usage            code histograms -> fraction of the codebook in use, dead codes, perplexity
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def reconstruction_loss(images, reconstructions):
    """L2: the mean over every pixel and channel."""
    return jnp.mean((reconstructions.astype(jnp.float32) - images.astype(jnp.float32)) ** 2)


# ----- codebook usage ---------------------------------------------------------------------------------------------

def code_histogram(codes, codebook_size: int):
    """How often each code occurs in `codes` (any shape): int32 (codebook_size,)."""
    return jnp.bincount(codes.reshape(-1), length=codebook_size).astype(jnp.int32)


def usage_stats(counts) -> dict[str, float]:
    """Statistics of a code histogram: the fraction of the codebook in use, the number of dead (unused) codes, and
    the perplexity exp(entropy) of the code distribution (= codebook size when every code is equally likely)."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        return {"usage": 0.0, "dead_codes": float(len(counts)), "perplexity": 0.0}
    p = counts[counts > 0] / total
    return {"usage": float((counts > 0).mean()), "dead_codes": float((counts == 0).sum()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


# ----- perceptual loss (LPIPS, VGG16) -----------------------------------------------------------------------------

# torchvision's vgg16().features: indices of the 3x3 convs, in order, with their widths; "M" is a 2x2 max pool.
VGG16_FEATURES = (0, 2, "M", 5, 7, "M", 10, 12, 14, "M", 17, 19, 21, "M", 24, 26, 28)
VGG16_WIDTHS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
                14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
                28: (512, 512)}
# LPIPS compares the ReLU outputs after these convs (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
LPIPS_TAPS = (2, 7, 14, 21, 28)
LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def perceptual_weight_shapes() -> dict[str, tuple[int, ...]]:
    """The keys and PyTorch-layout shapes a perceptual weights file must hold."""
    shapes = {}
    for i, (cin, cout) in VGG16_WIDTHS.items():
        shapes[f"features.{i}.weight"] = (cout, cin, 3, 3)
        shapes[f"features.{i}.bias"] = (cout,)
    for k, tap in enumerate(LPIPS_TAPS):
        shapes[f"lin{k}.model.1.weight"] = (1, VGG16_WIDTHS[tap][1], 1, 1)
    return shapes


PERCEPTUAL_FILE_HELP = (
    "The file holds torchvision's VGG16 `features.{i}.weight/bias` and the LPIPS v0.1 linear layers "
    "`lin{k}.model.1.weight` (the `net.slice{s}.{i}.*` names of LPIPS/LlamaGen checkpoints are accepted too), as "
    ".safetensors, .npz or .pt (.pt needs the torch extra). Make one where the weights can be downloaded, e.g. "
    "merge torchvision.models.vgg16(weights='IMAGENET1K_V1').features.state_dict() (prefixed 'features.') with "
    "the LPIPS 'vgg.pth' state dict and save_file() it.")


def load_perceptual_weights(path: str) -> dict[str, np.ndarray]:
    """Read and check a VGG16 + LPIPS weights file; returns {key: float32 array in PyTorch layout}."""
    if not path:
        raise ValueError("the perceptual loss needs a weights file (config.loss.perceptual_weights); set "
                         "config.loss.perceptual_weight=0 to train without it. " + PERCEPTUAL_FILE_HELP)
    if not os.path.exists(path):
        raise FileNotFoundError(f"perceptual weights file {path} does not exist. " + PERCEPTUAL_FILE_HELP)
    if path.endswith(".npz"):
        with np.load(path) as f:
            raw = {k: f[k] for k in f.files}
    else:
        from par_jax.core import state_dict as io_lib  # noqa: PLC0415 (.pt / .safetensors readers)
        raw = io_lib.load_state_dict(path)
    found = {re.sub(r"^net\.slice\d+\.", "features.", k): np.asarray(v, np.float32) for k, v in raw.items()}
    expected = perceptual_weight_shapes()
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in found]
    problems += [f"{k}: expected {s}, found {found[k].shape}" for k, s in expected.items()
                 if k in found and found[k].shape != s]
    if problems:
        raise ValueError(f"{path} is not a VGG16 + LPIPS weights file:\n  " + "\n  ".join(problems) + "\n"
                         + PERCEPTUAL_FILE_HELP)
    return {k: found[k] for k in expected}


def _vgg_conv(x, w, b):
    w = jnp.transpose(w, (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + b)


def _max_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def perceptual_loss(weights: Mapping[str, jax.Array], images, reconstructions):
    """LPIPS distance per image (B,) between two batches of (B, H, W, 3) images in [-1, 1]. Frozen weights."""
    weights = jax.lax.stop_gradient(dict(weights))
    x = jnp.concatenate([images, reconstructions]).astype(jnp.float32)
    h = (x - LPIPS_SHIFT) / LPIPS_SCALE
    total = 0.0
    for item in VGG16_FEATURES:
        if item == "M":
            h = _max_pool(h)
            continue
        h = _vgg_conv(h, weights[f"features.{item}.weight"], weights[f"features.{item}.bias"])
        if item in LPIPS_TAPS:
            k = LPIPS_TAPS.index(item)
            f = h / (jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True)) + 1e-10)
            a, b = jnp.split(f, 2)
            lin = weights[f"lin{k}.model.1.weight"].reshape(-1)
            total = total + jnp.mean(jnp.sum((a - b) ** 2 * lin, axis=-1), axis=(1, 2))
    return total


# ----- adversarial loss (PatchGAN, hinge) -------------------------------------------------------------------------

class BatchNorm(nnx.Module):
    """Batch normalisation with the current batch's statistics. The discriminator only ever runs in training mode
    here, so the running averages of a torch BatchNorm2d would never be read and are not kept."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.scale = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x):
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.var(x, axis=(0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]


class PatchDiscriminator(nnx.Module):
    """The pix2pix / taming PatchGAN: 4x4 convs (stride 2, then 1), batch norm, LeakyReLU 0.2; one logit per patch."""

    def __init__(self, channels: int = 64, num_layers: int = 3, in_channels: int = 3, *, rngs: nnx.Rngs):
        def init(key, shape, dtype=jnp.float32):  # N(0, 0.02), drawn flat (see vq.flat_uniform)
            return 0.02 * jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)

        def conv(cin, cout, stride, bias):
            return nnx.Conv(cin, cout, (4, 4), strides=stride, padding=((1, 1), (1, 1)), use_bias=bias,
                            kernel_init=init, rngs=rngs)

        self.conv_in = conv(in_channels, channels, 2, True)
        convs, norms, mult = [], [], 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            convs.append(conv(channels * prev, channels * mult, 2 if n < num_layers else 1, False))
            norms.append(BatchNorm(channels * mult, rngs))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.conv_out = conv(channels * mult, 1, 1, True)

    def __call__(self, x):
        h = jax.nn.leaky_relu(self.conv_in(x.astype(jnp.float32)), 0.2)
        for conv, norm in zip(self.convs, self.norms):
            h = jax.nn.leaky_relu(norm(conv(h)), 0.2)
        return self.conv_out(h)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
    return -jnp.mean(logits_fake)
