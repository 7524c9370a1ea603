"""The video VQ tokenizer: clips (B, T, H, W, 3) in [-1, 1] <-> int32 codes (B, T', H', W') (PAR_SPEC section 14).

Two kinds, one interface (`encode`, `decode`, `config.latent_shape`):

  causal3d   MAGVIT-v2 style. Causal 3D convolutions: the kernel spans 3 frames, padded only on the past side (by
             repeating the first frame), so a latent never depends on a later frame. Each temporal downsampling maps
             1 + 2m frames to 1 + m (the first frame stays alone, later frames are reduced in pairs); two of them
             give 4x: 17 frames -> 5 latent frames, the first frame alone, then groups of 4. Space is downsampled by
             2 per level after the first, as in the image tokenizer. The decoder mirrors it: each temporal upsampling
             turns latent frame 0 into one frame and every later latent frame into two (a convolution to twice the
             channels, then the channels split into two frames).
  per_frame  the baseline: the image tokenizer's 2D encoder and decoder applied to every frame on its own; time is
             not compressed (T frames -> T latent frames).

Both quantize with the image tokenizer's `VectorQuantizer` (L2-normalised codebook, cosine lookup). Parameter names
follow the image model (encoder.conv_in, encoder.conv_blocks.{i}.res.{j}.conv1, quant_conv, quantize.embedding,
post_quant_conv, decoder...), with 3D kernels (t, h, w, in, out) in causal3d.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from par_jax.tokenizer import vq
from par_jax.utils import rng as rng_lib

KINDS = ("causal3d", "per_frame")
TIME_KERNEL = 3  # frames each causal convolution sees: the current one and the two before it

# name -> field overrides of VideoVQConfig.
CONFIGS: dict[str, dict[str, Any]] = {
    # Moving Fashion-MNIST, 17 frames at 32 px -> 5 x 8 x 8 codes: small enough to train in minutes on a CPU (the
    # full-resolution level dominates the cost: 16 channels there made a step 3x slower than these 8).
    "video": {},
    "video_per_frame": dict(kind="per_frame", temporal_downsample=1),
}


@dataclasses.dataclass(frozen=True)
class VideoVQConfig(vq.ConfigRecord):
    """Everything that fixes a video tokenizer's parameters and computation. Defaults: the CPU-sized causal3d."""
    kind_name = "video tokenizer"  # for errors (not a field)
    kind: str = "causal3d"
    frame_size: int = 32               # training resolution; encode accepts any multiple of `downsample`
    num_frames: int = 17               # training clip length (a runtime field: any valid length encodes)
    in_channels: int = 3
    base_channels: int = 8
    channel_mult: tuple[int, ...] = (1, 2, 4)   # per level, highest resolution first; 2x space per level after the first
    num_res_blocks: int = 1             # per encoder level; every decoder level has one more
    attn_levels: tuple[int, ...] = ()   # levels with attention (always within one frame) after each residual block
    z_channels: int = 32
    codebook_size: int = 512
    codebook_dim: int = 8
    l2_norm: bool = True
    commitment: float = 0.25
    num_groups: int = 4
    norm_eps: float = 1e-6
    dropout: float = 0.0
    temporal_downsample: int = 4        # causal3d: 2 ** (temporal levels); per_frame: 1
    dtype: str = "float32"
    # causal3d kernels start as 2D ones on the newest frame(s) they read, zero on older frames (`CausalConv3d`):
    # started with random weights on every frame, the demo-size model blurred each garment over its path and
    # collapsed its codebook (4.5% of 512 codes in use at 100 steps, 14.4 dB); False restores that init.
    inflate_init: bool = True

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_levels", tuple(int(a) for a in self.attn_levels))
        errors = []
        if self.kind not in KINDS:
            errors.append(f"kind={self.kind!r} is not a video tokenizer kind; choose one of {KINDS}.")
        if not self.channel_mult:
            errors.append("channel_mult needs at least one level.")
        bad = [a for a in self.attn_levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            errors.append(f"attn_levels {bad} out of range for {len(self.channel_mult)} levels.")
        widths = {self.base_channels * m for m in self.channel_mult} | {self.base_channels}
        bad = sorted(w for w in widths if w % self.num_groups)
        if bad:
            errors.append(f"GroupNorm with num_groups={self.num_groups} needs every width divisible by it; widths "
                          f"{bad} are not (base_channels={self.base_channels}, channel_mult={self.channel_mult}).")
        td = self.temporal_downsample
        if self.kind == "per_frame" and td != 1:
            errors.append(f"a per_frame tokenizer does not compress time: temporal_downsample must be 1, not {td}.")
        if self.kind != "per_frame":
            spatial_levels = len(self.channel_mult) - 1
            if td < 1 or td & (td - 1) or int(math.log2(td)) > spatial_levels:
                errors.append(f"temporal_downsample={td} must be a power of 2 of at most 2 ** {spatial_levels} "
                              f"(one temporal halving per downsampling level; channel_mult={self.channel_mult}).")
        if self.channel_mult and self.frame_size % self.downsample:
            errors.append(f"frame_size={self.frame_size} must be a multiple of the spatial downsampling factor "
                          f"{self.downsample} (2 ** (levels - 1)).")
        if self.codebook_size < 2 or self.codebook_dim < 1:
            errors.append("codebook_size must be at least 2 and codebook_dim at least 1.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            errors.append(f"unknown compute dtype {self.dtype!r}; use float32, bfloat16 or float16.")
        if errors:
            raise ValueError("bad video tokenizer config:\n  " + "\n  ".join(errors))
        if self.num_frames < 1 or (self.num_frames - 1) % self.temporal_downsample:
            self.latent_shape(self.num_frames, self.frame_size)  # raises the frame-count message

    @property
    def downsample(self) -> int:
        """Spatial downsampling factor."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def temporal_levels(self) -> int:
        return int(math.log2(self.temporal_downsample)) if self.kind == "causal3d" else 0

    def temporal_at(self, level: int) -> bool:
        """Whether the downsampling after encoder level `level` (and the upsampling back to it) also halves time:
        the last `temporal_levels` ones, where the maps are small and 3D work is cheap."""
        return level >= len(self.channel_mult) - 1 - self.temporal_levels

    def latent_shape(self, num_frames: int, frame_size: int) -> tuple[int, int, int]:
        """Code grid (T', H', W') of a clip of `num_frames` square frames of side `frame_size`."""
        td, f = self.temporal_downsample, self.downsample
        if self.kind == "causal3d" and td > 1 and (num_frames < 1 or (num_frames - 1) % td):
            examples = ", ".join(str(1 + td * k) for k in range(1, 5))
            raise ValueError(f"a causal3d tokenizer with {td}x temporal compression takes 1 + {td}k frames "
                             f"({examples}, ...); got {num_frames}.")
        if num_frames < 1:
            raise ValueError(f"a clip needs at least one frame; got {num_frames}.")
        if frame_size % f:
            raise ValueError(f"frame size {frame_size} is not a multiple of the tokenizer's spatial downsampling "
                             f"factor {f}; resize, crop or pad the frames.")
        frames = 1 + (num_frames - 1) // td if self.kind == "causal3d" else num_frames
        return (frames, frame_size // f, frame_size // f)

    def num_frames_of(self, latent_frames: int) -> int:
        """Frames a clip of `latent_frames` latent frames decodes to."""
        return 1 + self.temporal_downsample * (latent_frames - 1) if self.kind == "causal3d" else latent_frames

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Code grid of a training clip (`num_frames` frames of `frame_size`)."""
        return self.latent_shape(self.num_frames, self.frame_size)



def video_vq_config(name: str = "video", **overrides: Any) -> VideoVQConfig:
    """A named video tokenizer configuration with field overrides, e.g. video_vq_config("video", codebook_size=1024)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown video tokenizer config {name!r}; known: {sorted(CONFIGS)}.")
    return VideoVQConfig.from_dict({**CONFIGS[name], **overrides})


def is_video_config_dict(d) -> bool:
    """Whether a stored or configured tokenizer config (a dict) describes a video tokenizer: only those have `kind`."""
    return "kind" in d


def from_config_dict(cfg) -> VideoVQConfig:
    """VideoVQConfig from an ml_collections `config.tokenizer` block: a `name` key plus field overrides."""
    d = dict(cfg)
    name = d.pop("name", "video")
    return video_vq_config(name, **d)


# ----------------------------------------------------------------------------------------------------------------
# Causal 3D building blocks. Activations are (B, T, H, W, C).


def _frames(x):
    """(B, T, H, W, C) -> (B * T, H, W, C): per-frame work through the 2D layers."""
    return x.reshape((-1,) + x.shape[2:])


def _clips(x, b: int):
    return x.reshape((b, -1) + x.shape[1:])


def frame_norm(norm: nnx.GroupNorm, x):
    # GroupNorm statistics per frame (over H, W and the channel group), never over time: statistics pooled over the
    # clip would let every later frame shift the normalisation of the first, i.e. leak the future into the past.
    return _clips(norm(_frames(x)), x.shape[0])


class CausalConv3d(nnx.Module):
    """A (TIME_KERNEL, k, k) convolution (kernel (t, k, k, in, out)), causal in time: the input is padded on the
    past side with copies of the first frame (not zeros, so a still clip stays still at its start), SAME in space.

    strides=(2, 2, 2) with the release's asymmetric (0, 1) spatial padding is the downsampling convolution: with
    two frames of past padding, output j reads frames 2j-2, 2j-1, 2j, so 1 + 2m frames become 1 + m, output 0 sees
    only frame 0, and output j sees nothing after frame 2j.

    It runs as one 2D convolution over frames whose channels stack the frame and the two before it: the same sums as
    a 3D convolution, and XLA:CPU runs it ~3x faster (0.45 s against 1.5 s for forward and backward of a 16-channel
    8 x 17 x 32 x 32 batch), which decides whether the demo's tokenizer trains in minutes."""

    def __init__(self, cfg: VideoVQConfig, cin: int, cout: int, kernel: int, rngs: nnx.Rngs, *, strides=(1, 1, 1)):
        self.time_kernel = TIME_KERNEL if kernel > 1 else 1
        self.strides = tuple(strides)
        self.space_pad = ((0, 1), (0, 1)) if strides[1] == 2 else ((kernel // 2, kernel // 2),) * 2
        self.dtype = cfg.dtype
        shape = (self.time_kernel, kernel, kernel, cin, cout)
        # With `inflate_init` only the newest taps start non-zero: the current frame's, or at a time stride of 2
        # the two frames the output reduces (2j - 1, 2j). The network then starts as a per-frame one (time stride
        # aside), which trains like the image tokenizer; the older taps get gradients and learn the motion.
        live = min(2 if self.strides[0] == 2 else 1, self.time_kernel) if cfg.inflate_init else self.time_kernel
        k = vq.lecun_normal(rngs.params(), (live,) + shape[1:])
        self.kernel = nnx.Param(jnp.concatenate([jnp.zeros((shape[0] - live,) + shape[1:], jnp.float32), k]))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))

    def __call__(self, x):
        dtype = jnp.dtype(self.dtype)
        kt, st = self.time_kernel, self.strides[0]
        b, t = x.shape[:2]
        if kt > 1:
            x = jnp.concatenate([jnp.repeat(x[:, :1], kt - 1, axis=1), x], axis=1)
        out_t = (x.shape[1] - kt) // st + 1
        # Channels of output frame j: input frames j*st + 0 .. kt-1 (padded indices), oldest first, as the kernel.
        taps = [x[:, dt:dt + st * (out_t - 1) + 1:st] for dt in range(kt)]
        stacked = jnp.concatenate(taps, axis=-1).reshape((b * out_t,) + x.shape[2:4] + (-1,))
        k = self.kernel[...]
        k = k.transpose(1, 2, 0, 3, 4).reshape(k.shape[1], k.shape[2], kt * k.shape[3], k.shape[4])
        y = jax.lax.conv_general_dilated(stacked.astype(dtype), k.astype(dtype), self.strides[1:], self.space_pad,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + self.bias[...].astype(dtype)
        return y.reshape((b, out_t) + y.shape[1:])


class ResnetBlock3d(nnx.Module):
    """norm, swish, causal conv, norm, swish, dropout, causal conv; a 1x1x1 shortcut when the width changes."""

    def __init__(self, cfg: VideoVQConfig, cin: int, cout: int, rngs: nnx.Rngs):
        self.norm1 = vq._group_norm(cfg, cin, rngs)
        self.conv1 = CausalConv3d(cfg, cin, cout, 3, rngs)
        self.norm2 = vq._group_norm(cfg, cout, rngs)
        self.dropout = cfg.dropout
        self.conv2 = CausalConv3d(cfg, cout, cout, 3, rngs)
        self.nin_shortcut = CausalConv3d(cfg, cin, cout, 1, rngs) if cin != cout else None

    def __call__(self, x, rng=None):
        h = self.conv1(vq.swish(frame_norm(self.norm1, x)))
        h = rng_lib.dropout(vq.swish(frame_norm(self.norm2, h)), self.dropout, rng)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class FrameAttention(nnx.Module):
    """The image tokenizer's attention block over the positions of one frame at a time: attending across frames
    would let a frame see later ones."""

    def __init__(self, cfg: VideoVQConfig, channels: int, rngs: nnx.Rngs):
        self.block = vq.AttnBlock(cfg, channels, rngs)

    def __call__(self, x):
        return _clips(self.block(_frames(x)), x.shape[0])


class Downsample3d(nnx.Module):
    """Stride 2 in space, and in time too at temporal levels (1 + 2m -> 1 + m frames)."""

    def __init__(self, cfg: VideoVQConfig, channels: int, temporal: bool, rngs: nnx.Rngs):
        self.conv = CausalConv3d(cfg, channels, channels, 3, rngs, strides=(2 if temporal else 1, 2, 2))

    def __call__(self, x):
        return self.conv(x)


class Upsample3d(nnx.Module):
    """Nearest-neighbour x2 in space, then a causal conv; at temporal levels the conv makes twice the channels and
    each latent frame's channels split into two frames, of which latent frame 0 keeps only the second: 1 + m frames
    -> 1 + 2m, frame 0 from latent frame 0 alone, frames 2j-1 and 2j from latent frames up to j."""

    def __init__(self, cfg: VideoVQConfig, channels: int, temporal: bool, rngs: nnx.Rngs):
        self.temporal = temporal
        self.conv = CausalConv3d(cfg, channels, channels * (2 if temporal else 1), 3, rngs)

    def __call__(self, x):
        h = self.conv(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3))
        if not self.temporal:
            return h
        b, t, hh, ww, c2 = h.shape
        h = h.reshape(b, t, hh, ww, 2, c2 // 2)
        h = jnp.moveaxis(h, 4, 2).reshape(b, 2 * t, hh, ww, c2 // 2)
        return h[:, 1:]


def _level(cfg: VideoVQConfig, cin: int, cout: int, num_res: int, attention: bool, rngs, *, downsample: bool = False,
           upsample: bool = False, temporal: bool = False) -> vq.ConvBlock:
    """One resolution level: the image tokenizer's ConvBlock built from the 3D blocks."""
    return vq.ConvBlock(
        cfg, cin, cout, num_res, attention, rngs, resnet=ResnetBlock3d, attend=FrameAttention,
        downsample=(lambda c, r: Downsample3d(cfg, c, temporal, r)) if downsample else None,
        upsample=(lambda c, r: Upsample3d(cfg, c, temporal, r)) if upsample else None)


class Encoder3d(nnx.Module):
    def __init__(self, cfg: VideoVQConfig, rngs: nnx.Rngs):
        ch, mult, levels = cfg.base_channels, cfg.channel_mult, len(cfg.channel_mult)
        self.conv_in = CausalConv3d(cfg, cfg.in_channels, ch, 3, rngs)
        blocks, cin = [], ch
        for i, m in enumerate(mult):
            blocks.append(_level(cfg, cin, ch * m, cfg.num_res_blocks, i in cfg.attn_levels, rngs,
                                 downsample=i < levels - 1, temporal=cfg.temporal_at(i)))
            cin = ch * m
        self.conv_blocks = nnx.List(blocks)
        self.mid = vq._middle(cfg, cin, rngs, ResnetBlock3d, FrameAttention)
        self.norm_out = vq._group_norm(cfg, cin, rngs)
        self.conv_out = CausalConv3d(cfg, cin, cfg.z_channels, 3, rngs)

    def __call__(self, x, rng=None):
        r_blocks, r_mid = rng_lib.split(rng, 2)
        h = self.conv_in(x)
        for block, r in zip(self.conv_blocks, rng_lib.split(r_blocks, len(self.conv_blocks))):
            h = block(h, r)
        h = vq._middle_forward(self.mid, h, r_mid)
        return self.conv_out(vq.swish(frame_norm(self.norm_out, h)))


class Decoder3d(nnx.Module):
    def __init__(self, cfg: VideoVQConfig, rngs: nnx.Rngs):
        ch, mult, levels = cfg.base_channels, cfg.channel_mult, len(cfg.channel_mult)
        cin = ch * mult[-1]
        self.conv_in = CausalConv3d(cfg, cfg.z_channels, cin, 3, rngs)
        self.mid = vq._middle(cfg, cin, rngs, ResnetBlock3d, FrameAttention)
        blocks = []
        for i in reversed(range(levels)):
            # Level i's upsampling undoes the encoder's downsampling after level i - 1.
            blocks.append(_level(cfg, cin, ch * mult[i], cfg.num_res_blocks + 1, i in cfg.attn_levels, rngs,
                                 upsample=i > 0, temporal=i > 0 and cfg.temporal_at(i - 1)))
            cin = ch * mult[i]
        self.conv_blocks = nnx.List(blocks)
        self.norm_out = vq._group_norm(cfg, cin, rngs)
        self.conv_out = CausalConv3d(cfg, cin, cfg.in_channels, 3, rngs)

    def __call__(self, z, rng=None):
        r_blocks, r_mid = rng_lib.split(rng, 2)
        h = vq._middle_forward(self.mid, self.conv_in(z), r_mid)
        for block, r in zip(self.conv_blocks, rng_lib.split(r_blocks, len(self.conv_blocks))):
            h = block(h, r)
        return self.conv_out(vq.swish(frame_norm(self.norm_out, h)))


class PerFrame(nnx.Module):
    """A 2D image encoder or decoder applied to every frame on its own (the per_frame baseline)."""

    def __init__(self, net: nnx.Module):
        self.net = net

    def __call__(self, x, rng=None):
        return _clips(self.net(_frames(x), rng), x.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# The model


class VideoVQModel(vq.Autoencoder):
    """encode: clips (B, T, H, W, 3) in [-1, 1] -> codes (B, T', H', W') int32; decode: codes -> clips in [-1, 1]."""

    is_video = True
    code_ndim = 4
    code_grid_hint = "(batch, frames, height, width) grids of video codes"

    def __init__(self, cfg: VideoVQConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        if cfg.kind == "causal3d":
            self.encoder = Encoder3d(cfg, rngs)
            self.decoder = Decoder3d(cfg, rngs)
        else:
            # The image blocks read only fields the video config shares with VQConfig.
            self.encoder = PerFrame(vq.Encoder(cfg, rngs))
            self.decoder = PerFrame(vq.Decoder(cfg, rngs))
        self.quant_conv = CausalConv3d(cfg, cfg.z_channels, cfg.codebook_dim, 1, rngs)
        self.post_quant_conv = CausalConv3d(cfg, cfg.codebook_dim, cfg.z_channels, 1, rngs)
        self.quantize = vq.VectorQuantizer(cfg, rngs)

    def check_inputs(self, clips):
        """Static checks always; value checks only on concrete arrays, outside jit."""
        cfg = self.config
        if clips.ndim != 5 or clips.shape[-1] != cfg.in_channels:
            hint = (" (one clip? add a batch axis: clips[None])" if clips.ndim == 4 else
                    " (images? use the image tokenizer, or a clip per image)" if clips.ndim < 4 else "")
            raise ValueError(f"clips must be (batch, frames, height, width, {cfg.in_channels}) channels-last; got "
                             f"shape {tuple(clips.shape)}{hint}.")
        t, h, w = clips.shape[1:4]
        if h != w:
            raise ValueError(f"frames must be square; got {h}x{w} (crop or resize them).")
        cfg.latent_shape(t, h)  # frame count and size
        if not jnp.issubdtype(clips.dtype, jnp.floating):
            raise ValueError(f"clips must be floats in [-1, 1]; got dtype {clips.dtype} (convert uint8 frames with "
                             f"x / 127.5 - 1).")
        self._check_range(clips, "clips", "convert uint8 frames with x / 127.5 - 1")


def param_shapes(cfg: VideoVQConfig) -> dict[str, tuple[int, ...]]:
    """Flat {"encoder.conv_in.conv.kernel": shape, ...} of a configuration, without allocating it."""
    abstract = nnx.eval_shape(lambda: VideoVQModel(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {".".join(str(p) for p in path): tuple(v.shape) for path, v in flat}


def count_params(cfg: VideoVQConfig) -> int:
    return sum(int(np.prod(shape)) for shape in param_shapes(cfg).values())
