"""The VQ image tokenizer: LlamaGen's VQ-16 (PAR_SPEC section 8) in Flax NNX, configurable down to CPU sizes.

Images are NHWC floats in [-1, 1]. The encoder downsamples by 2 per level after the first (VQ-16: five levels, 16x),
`quant_conv` maps to the code space, and the quantizer replaces every vector by its nearest codebook entry. With
`l2_norm` (LlamaGen's setting) both the encoder output and the codebook are L2-normalised, so "nearest" is the
largest cosine similarity, and the decoder sees unit vectors. Gradients pass the quantizer straight through.

Submodule names follow the PyTorch release so that a converter maps keys one to one (torch (out, in, kh, kw) conv
weights become `kernel` (kh, kw, in, out); GroupNorm `weight` becomes `scale`):

    encoder.conv_in, encoder.conv_blocks.{i}.res.{j}.{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.conv_blocks.{i}.attn.{j}.{norm,q,k,v,proj_out}, encoder.conv_blocks.{i}.downsample.conv,
    encoder.mid.{0,1,2}, encoder.norm_out, encoder.conv_out, quant_conv, quantize.embedding (torch
    `quantize.embedding.weight`), post_quant_conv, decoder.conv_in, decoder.mid.{0,1,2},
    decoder.conv_blocks.{i}.res.{j}, decoder.conv_blocks.{i}.attn.{j}, decoder.conv_blocks.{i}.upsample.conv,
    decoder.norm_out, decoder.conv_out.

The decoder's `conv_blocks[i]` is level `L-1-i` (lowest resolution first), as in the release. The tokenizer is small
next to the decoder (VQ-16 has 72M parameters), so training replicates it and shards only the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from par_jax.utils import rng as rng_lib

# name -> field overrides of VQConfig (whose defaults are VQ-16).
CONFIGS: dict[str, dict[str, Any]] = {
    "vq16": {},
    # Fashion-MNIST (28x28 grey, padded to 32x32, replicated to 3 channels): 4x downsampling gives an 8x8 token grid,
    # which n=4 (4x4 regions) and n=16 (2x2 regions) both divide. Compute is balanced across the three levels.
    # Sized to train in well under an hour on two CPU cores (~0.2 GFLOP per image forward).
    "fmnist": dict(image_size=32, base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attn_levels=(2,),
                   z_channels=32, codebook_size=512, codebook_dim=8, num_groups=8),
}


class ConfigRecord:
    """What the image and the video tokenizer configs share: a frozen dataclass that is copied with changes, written
    as JSON and read back from a dict (JSON lists become tuples), refusing unknown fields by name."""

    kind_name = "tokenizer"  # for errors

    def replace(self, **kwargs):
        return dataclasses.replace(self, **kwargs)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown {cls.kind_name} config fields {unknown}; known fields: {sorted(fields)}.")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class VQConfig(ConfigRecord):
    """Everything that fixes the tokenizer's parameters and computation. Defaults are LlamaGen's VQ-16."""
    image_size: int = 256               # training resolution; encode accepts any multiple of `downsample`
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)   # per level, highest resolution first
    num_res_blocks: int = 2             # per encoder level; every decoder level has one more
    attn_levels: tuple[int, ...] = (4,)  # levels with a self-attention block after each residual block
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    l2_norm: bool = True                # cosine nearest-code lookup on L2-normalised codes and encoder outputs
    commitment: float = 0.25            # beta of the commitment loss
    num_groups: int = 32                # GroupNorm groups
    norm_eps: float = 1e-6
    dropout: float = 0.0                # inside residual blocks (LlamaGen trains with 0)
    dtype: str = "float32"              # compute dtype; parameters are float32, norms and the lookup run in float32

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_levels", tuple(int(a) for a in self.attn_levels))
        if not self.channel_mult:
            raise ValueError("channel_mult needs at least one level.")
        bad = [a for a in self.attn_levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attn_levels {bad} out of range for {len(self.channel_mult)} levels "
                             f"(channel_mult={self.channel_mult}).")
        widths = {self.base_channels * m for m in self.channel_mult} | {self.base_channels}
        bad = sorted(w for w in widths if w % self.num_groups)
        if bad:
            raise ValueError(f"GroupNorm with num_groups={self.num_groups} needs every width divisible by it; "
                             f"widths {bad} are not (base_channels={self.base_channels}, "
                             f"channel_mult={self.channel_mult}).")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size={self.image_size} must be a multiple of the downsampling factor "
                             f"{self.downsample} (2 ** (levels - 1)).")
        if self.codebook_size < 2 or self.codebook_dim < 1:
            raise ValueError("codebook_size must be at least 2 and codebook_dim at least 1.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown compute dtype {self.dtype!r}; use float32, bfloat16 or float16.")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Token grid of an `image_size` image."""
        side = self.image_size // self.downsample
        return (side, side)



def vq_config(name: str = "vq16", **overrides: Any) -> VQConfig:
    """A named tokenizer configuration with field overrides, e.g. vq_config("vq16", image_size=384)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown tokenizer config {name!r}; known: {sorted(CONFIGS)}.")
    return VQConfig.from_dict({**CONFIGS[name], **overrides})


def from_config_dict(cfg) -> VQConfig:
    """VQConfig from an ml_collections `config.tokenizer` block: a `name` key plus field overrides."""
    d = dict(cfg)
    name = d.pop("name", "vq16")
    for key in ("channel_mult", "attn_levels"):
        if key in d:
            d[key] = tuple(d[key])
    return vq_config(name, **d)


def count_params(cfg: VQConfig) -> int:
    return sum(int(np.prod(shape)) for shape in param_shapes(cfg).values())


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def swish(x):
    return x * jax.nn.sigmoid(x)


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / max(||x||, eps), as torch's F.normalize (the release normalises this way)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)



def flat_uniform(key, shape, dtype=jnp.float32, low=-1.0, high=1.0):
    # Drawn flat, then reshaped: XLA:CPU compiles multi-dimensional threefry draws very slowly (~20 s for one
    # (3, 3, 8, 9) draw on a busy 2-core machine, under 1 s flat), and eager init compiles one draw per shape.
    return jax.random.uniform(key, (int(np.prod(shape)),), dtype, low, high).reshape(shape)


def lecun_normal(key, shape, dtype=jnp.float32):
    """Flax's default kernel init (truncated normal, variance 1/fan_in), drawn flat. shape = (kh, kw, in, out).

    Not PyTorch's default (uniform, variance 1/(3 fan_in)), which the release starts from: on Fashion-MNIST the
    smaller start left fewer codes in use (35% against 55% of 512 after 600 steps, one run each)."""
    std = np.sqrt(1.0 / np.prod(shape[:-1])) / 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]
    return (std * jax.random.truncated_normal(key, -2.0, 2.0, (int(np.prod(shape)),), dtype)).reshape(shape)


def _conv(cfg: VQConfig, cin: int, cout: int, kernel: int, rngs: nnx.Rngs, *, strides=1, padding="SAME"):
    return nnx.Conv(cin, cout, (kernel, kernel), strides=strides, padding=padding, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.float32, kernel_init=lecun_normal, rngs=rngs)


def _group_norm(cfg: VQConfig, channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Statistics in float32 whatever the compute dtype (bf16 statistics drift); the next conv casts back.
    return nnx.GroupNorm(channels, num_groups=cfg.num_groups, epsilon=cfg.norm_eps, dtype=jnp.float32, rngs=rngs)


class ResnetBlock(nnx.Module):
    """norm, swish, 3x3 conv, norm, swish, dropout, 3x3 conv; a 1x1 shortcut conv when the width changes."""

    def __init__(self, cfg: VQConfig, cin: int, cout: int, rngs: nnx.Rngs):
        self.norm1 = _group_norm(cfg, cin, rngs)
        self.conv1 = _conv(cfg, cin, cout, 3, rngs)
        self.norm2 = _group_norm(cfg, cout, rngs)
        self.dropout = cfg.dropout
        self.conv2 = _conv(cfg, cout, cout, 3, rngs)
        self.nin_shortcut = _conv(cfg, cin, cout, 1, rngs) if cin != cout else None

    def __call__(self, x, rng=None):
        h = self.conv1(swish(self.norm1(x)))
        h = rng_lib.dropout(swish(self.norm2(h)), self.dropout, rng)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv q, k, v and output projections."""

    def __init__(self, cfg: VQConfig, channels: int, rngs: nnx.Rngs):
        self.norm = _group_norm(cfg, channels, rngs)
        self.q = _conv(cfg, channels, channels, 1, rngs)
        self.k = _conv(cfg, channels, channels, 1, rngs)
        self.v = _conv(cfg, channels, channels, 1, rngs)
        self.proj_out = _conv(cfg, channels, channels, 1, rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.norm(x)
        q, k, v = (f(y).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, h, w, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after zero padding of one row at the bottom and one column at the right (the release's
    asymmetric (0, 1, 0, 1) padding), so an even side halves exactly."""

    def __init__(self, cfg: VQConfig, channels: int, rngs: nnx.Rngs):
        self.conv = _conv(cfg, channels, channels, 3, rngs, strides=2, padding="VALID")

    def __call__(self, x):
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, cfg: VQConfig, channels: int, rngs: nnx.Rngs):
        self.conv = _conv(cfg, channels, channels, 3, rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class ConvBlock(nnx.Module):
    """One resolution level: residual blocks (each followed by attention at attention levels), then resampling."""

    def __init__(self, cfg: VQConfig, cin: int, cout: int, num_res: int, attention: bool, rngs, *,
                 downsample=None, upsample=None, resnet=ResnetBlock, attend=AttnBlock):
        """downsample / upsample: (channels, rngs) -> module, or None; resnet / attend: the block classes (the video
        tokenizer passes its 3D ones)."""
        res, attn = [], []
        for _ in range(num_res):
            res.append(resnet(cfg, cin, cout, rngs))
            cin = cout
            if attention:
                attn.append(attend(cfg, cout, rngs))
        self.res = nnx.List(res)
        self.attn = nnx.List(attn)
        self.downsample = downsample(cout, rngs) if downsample else None
        self.upsample = upsample(cout, rngs) if upsample else None

    def __call__(self, x, rng=None):
        for i, (block, r) in enumerate(zip(self.res, rng_lib.split(rng, len(self.res)))):
            x = block(x, r)
            if len(self.attn):
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def _middle(cfg: VQConfig, channels: int, rngs: nnx.Rngs, resnet=ResnetBlock, attend=AttnBlock) -> nnx.List:
    return nnx.List([resnet(cfg, channels, channels, rngs), attend(cfg, channels, rngs),
                     resnet(cfg, channels, channels, rngs)])


def _middle_forward(mid: nnx.List, h, rng):
    r1, r2 = rng_lib.split(rng, 2)
    return mid[2](mid[1](mid[0](h, r1)), r2)


class Encoder(nnx.Module):
    def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
        ch, mult, levels = cfg.base_channels, cfg.channel_mult, len(cfg.channel_mult)
        self.conv_in = _conv(cfg, cfg.in_channels, ch, 3, rngs)
        blocks, cin = [], ch
        for i, m in enumerate(mult):
            blocks.append(ConvBlock(cfg, cin, ch * m, cfg.num_res_blocks, i in cfg.attn_levels, rngs,
                                    downsample=functools.partial(Downsample, cfg) if i < levels - 1 else None))
            cin = ch * m
        self.conv_blocks = nnx.List(blocks)
        self.mid = _middle(cfg, cin, rngs)
        self.norm_out = _group_norm(cfg, cin, rngs)
        self.conv_out = _conv(cfg, cin, cfg.z_channels, 3, rngs)

    def __call__(self, x, rng=None):
        r_blocks, r_mid = rng_lib.split(rng, 2)
        h = self.conv_in(x)
        for block, r in zip(self.conv_blocks, rng_lib.split(r_blocks, len(self.conv_blocks))):
            h = block(h, r)
        h = _middle_forward(self.mid, h, r_mid)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
        ch, mult, levels = cfg.base_channels, cfg.channel_mult, len(cfg.channel_mult)
        cin = ch * mult[-1]
        self.conv_in = _conv(cfg, cfg.z_channels, cin, 3, rngs)
        self.mid = _middle(cfg, cin, rngs)
        blocks = []
        for i in reversed(range(levels)):
            blocks.append(ConvBlock(cfg, cin, ch * mult[i], cfg.num_res_blocks + 1, i in cfg.attn_levels, rngs,
                                    upsample=functools.partial(Upsample, cfg) if i > 0 else None))
            cin = ch * mult[i]
        self.conv_blocks = nnx.List(blocks)
        self.norm_out = _group_norm(cfg, cin, rngs)
        self.conv_out = _conv(cfg, cin, cfg.in_channels, 3, rngs)

    def __call__(self, z, rng=None):
        r_blocks, r_mid = rng_lib.split(rng, 2)
        h = _middle_forward(self.mid, self.conv_in(z), r_mid)
        for block, r in zip(self.conv_blocks, rng_lib.split(r_blocks, len(self.conv_blocks))):
            h = block(h, r)
        return self.conv_out(swish(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# Quantizer


class Quantized(NamedTuple):
    """The quantizer's output. `z_q` carries straight-through gradients to the encoder."""
    z_q: jax.Array             # (B, h, w, D) float32: the chosen codes (normalised when l2_norm), value-wise
    codes: jax.Array           # (B, h, w) int32
    codebook_loss: jax.Array   # mean ||sg(z) - e||^2: moves the codebook towards the encoder outputs
    commit_loss: jax.Array     # beta * mean ||z - sg(e)||^2: keeps the encoder near its codes
    latent: jax.Array | None = None  # (B, h, w, D) float32: the encoder output looked up (normalised when l2_norm);
                                     # training re-seeds dead codes from it (train.dead_code_restart)


class VectorQuantizer(nnx.Module):
    def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
        self.config = cfg
        k = 1.0 / cfg.codebook_size
        init = flat_uniform(rngs.params(), (cfg.codebook_size, cfg.codebook_dim), jnp.float32, -k, k)
        if cfg.l2_norm:
            init = l2_normalize(init)
        self.embedding = nnx.Param(init)

    def codebook(self):
        """The (K, D) float32 code vectors the lookup and the decoder use (unit rows when l2_norm)."""
        e = self.embedding[...].astype(jnp.float32)
        return l2_normalize(e) if self.config.l2_norm else e

    def _check_dim(self, x, what: str):
        if x.shape[-1] != self.config.codebook_dim:
            raise ValueError(f"{what} has {x.shape[-1]} channels but the codebook dimension is "
                             f"{self.config.codebook_dim}: it comes from a model with another codebook_dim "
                             f"(shape {x.shape}).")

    def nearest(self, z):
        """Codes (...,) int32 of the nearest codebook entries to z (..., D): cosine similarity when l2_norm."""
        self._check_dim(z, "the latent to quantize")
        e = self.codebook()
        z = z.astype(jnp.float32)
        if self.config.l2_norm:
            return jnp.argmax(l2_normalize(z) @ e.T, axis=-1).astype(jnp.int32)
        dist = jnp.sum(z * z, -1, keepdims=True) - 2 * z @ e.T + jnp.sum(e * e, -1)
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)

    def lookup(self, codes):
        return jnp.take(self.codebook(), codes, axis=0)

    def __call__(self, z) -> Quantized:
        self._check_dim(z, "the latent to quantize")
        z = z.astype(jnp.float32)
        if self.config.l2_norm:
            z = l2_normalize(z)
        codes = self.nearest(z)
        e = self.lookup(codes)
        sg = jax.lax.stop_gradient
        codebook_loss = jnp.mean((e - sg(z)) ** 2)
        commit_loss = self.config.commitment * jnp.mean((sg(e) - z) ** 2)
        return Quantized(z + sg(e - z), codes, codebook_loss, commit_loss, sg(z))


# ----------------------------------------------------------------------------------------------------------------
# The model


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class Autoencoder(nnx.Module):
    """What the image and the video tokenizer share: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder.

    A subclass builds those five modules and says what its inputs and code grids look like (`check_inputs`,
    `code_ndim`, `code_grid_hint`); the forward passes, the value checks and the compiled eager calls live here once.
    """

    is_video = False  # video tokenizers (video_vq.VideoVQModel) say True; callers branch on it, not on the class
    code_ndim = 3  # (batch, height, width); video codes add a frame axis
    code_grid_hint = "(batch, height, width) token grids"

    def check_inputs(self, x):
        raise NotImplementedError

    def check_codes(self, codes):
        if codes.ndim != self.code_ndim:
            raise ValueError(f"codes must be {self.code_grid_hint}; got shape {tuple(codes.shape)} (reshape "
                             f"raster-order (B, N) tokens to the grid first).")
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"codes must be integers; got dtype {codes.dtype}.")
        if _is_concrete(codes) and codes.size:
            lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
            if lo < 0 or hi >= self.config.codebook_size:
                raise ValueError(f"codes must lie in [0, {self.config.codebook_size}); got values in [{lo}, {hi}] "
                                 f"(tokens from a model with another vocabulary?).")

    def _check_range(self, x, what: str, hint: str):
        if _is_concrete(x) and x.size:
            lo, hi = float(jnp.min(x)), float(jnp.max(x))
            if lo < -1.001 or hi > 1.001:
                raise ValueError(f"{what} must lie in [-1, 1]; got values in [{lo:.3g}, {hi:.3g}] ({hint}).")

    # ----- the pieces -----

    def encode_latent(self, x, rng=None):
        """Continuous latents (B, *grid, codebook_dim) before quantization."""
        self.check_inputs(x)
        return self.quant_conv(self.encoder(x.astype(jnp.dtype(self.config.dtype)), rng))

    def decode_latent(self, z_q, rng=None):
        """Pixels from quantized latents, float32 and unclipped (training's reconstruction)."""
        self.quantize._check_dim(z_q, "the quantized latent to decode")
        z = self.post_quant_conv(z_q.astype(jnp.dtype(self.config.dtype)))
        return self.decoder(z, rng).astype(jnp.float32)

    def __call__(self, x, rng=None) -> tuple[jax.Array, Quantized]:
        """Training forward: (reconstruction float32, Quantized). A key turns dropout on."""
        r_enc, r_dec = rng_lib.split(rng, 2)
        q = self.quantize(self.encode_latent(x, r_enc))
        return self.decode_latent(q.z_q, r_dec), q

    # ----- the public interface -----

    def encode(self, x):
        """Pixels float in [-1, 1] -> int32 codes.

        Called on concrete arrays it checks their values and runs compiled; under a transformation it is traced.
        """
        self.check_inputs(x)
        return _encode(self, x) if _is_concrete(x) else self._encode(x)

    def decode(self, codes):
        """int codes -> pixels float32 in [-1, 1]. Compiled like `encode`."""
        self.check_codes(codes)
        return _decode(self, codes) if _is_concrete(codes) else self._decode(codes)

    def _encode(self, x):
        return self.quantize.nearest(self.encode_latent(x))

    def _decode(self, codes):
        return jnp.clip(self.decode_latent(self.quantize.lookup(codes)), -1.0, 1.0)


class VQModel(Autoencoder):
    """encode: images (B, H, W, C) in [-1, 1] -> codes (B, H/f, W/f) int32; decode: codes -> images in [-1, 1]."""

    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg, rngs)
        self.quant_conv = _conv(cfg, cfg.z_channels, cfg.codebook_dim, 1, rngs)
        self.quantize = VectorQuantizer(cfg, rngs)
        self.post_quant_conv = _conv(cfg, cfg.codebook_dim, cfg.z_channels, 1, rngs)
        self.decoder = Decoder(cfg, rngs)

    def check_inputs(self, images):
        """Static checks always; value checks only on concrete arrays, outside jit."""
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(f"images must be (batch, height, width, {cfg.in_channels}) channels-last; got shape "
                             f"{tuple(images.shape)}.")
        h, w = images.shape[1:3]
        if h % cfg.downsample or w % cfg.downsample:
            raise ValueError(f"image size {h}x{w} is not a multiple of the tokenizer's downsampling factor "
                             f"{cfg.downsample}; resize, crop or pad it (this tokenizer was trained at "
                             f"{cfg.image_size}x{cfg.image_size}).")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be floats in [-1, 1]; got dtype {images.dtype} (convert uint8 images "
                             f"with x / 127.5 - 1).")
        self._check_range(images, "images", "convert uint8 images with x / 127.5 - 1, [0, 1] images with 2 * x - 1")


# Eager calls of encode/decode run as one compiled program each (op-by-op dispatch of a conv net is slow); the model
# is an argument, not a baked-in constant, so one compilation serves every model of the same structure.
_encode = nnx.jit(lambda model, x: model._encode(x))
_decode = nnx.jit(lambda model, codes: model._decode(codes))


def param_shapes(cfg: VQConfig) -> dict[str, tuple[int, ...]]:
    """Flat {"encoder.conv_in.kernel": shape, ...} of a configuration, without allocating it (for converters)."""
    abstract = nnx.eval_shape(lambda: VQModel(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {".".join(str(p) for p in path): tuple(v.shape) for path, v in flat}

