"""The VQ tokenizers (LlamaGen VQ-16 for images by default; causal 3D or per-frame for video): models, losses,
training job, and loading a trained one.

    from par_jax import tokenizer
    model = tokenizer.load("workdirs/tokenizer_fmnist")       # a training workdir, a step or an export
    codes = model.encode(images)                              # (B, H, W, 3) in [-1, 1] -> (B, h, w) int32
    images = model.decode(codes)                              # -> (B, H, W, 3) in [-1, 1]

    video = tokenizer.load("workdirs/tokenizer_video")        # a VideoVQModel: video.is_video is True
    codes = video.encode(clips)                               # (B, T, H, W, 3) -> (B, T', H', W') int32
    clips = video.decode(codes)                               # -> (B, T, H, W, 3) in [-1, 1]
    video.config.latent_shape(17, 32)                         # (5, 8, 8) for the causal3d `video` config
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from par_jax.tokenizer import video_vq
from par_jax.tokenizer.video_vq import VideoVQConfig, VideoVQModel, video_vq_config
from par_jax.tokenizer.vq import CONFIGS, Quantized, VQConfig, VQModel, count_params, from_config_dict, vq_config

__all__ = ["CONFIGS", "Quantized", "VQConfig", "VQModel", "VideoVQConfig", "VideoVQModel", "count_params",
           "from_config_dict", "vq_config", "video_vq_config", "config_from_block", "build", "load", "read_config",
           "fingerprint"]

# Fields that change only how the model runs, not what its parameters mean.
# inflate_init only chooses the video kernels' starting values: a checkpoint trained either way loads under both.
RUNTIME_FIELDS = frozenset({"dtype", "dropout", "image_size", "frame_size", "num_frames", "inflate_init"})

AnyConfig = Union[VQConfig, VideoVQConfig]
AnyModel = Union[VQModel, VideoVQModel]


def config_from_block(block) -> AnyConfig:
    """The tokenizer config of an ml_collections `config.tokenizer` block: a video one when it has `kind`."""
    if video_vq.is_video_config_dict(block):
        return video_vq.from_config_dict(block)
    return from_config_dict(block)


def build(cfg: AnyConfig, rngs: nnx.Rngs) -> AnyModel:
    """A freshly initialised model of either kind of config."""
    return VideoVQModel(cfg, rngs=rngs) if isinstance(cfg, VideoVQConfig) else VQModel(cfg, rngs=rngs)


def _checkpoint_dir(path) -> epath.Path:
    from par_jax.core import checkpoint as ckpt_lib  # noqa: PLC0415
    return ckpt_lib.resolve(path, prefer_ema=False, what="tokenizer checkpoint").directory


def read_config(path) -> AnyConfig:
    """The config stored with a tokenizer checkpoint: a VideoVQConfig for video tokenizers, else a VQConfig."""
    directory = _checkpoint_dir(epath.Path(path))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        d = ckptr.restore(directory, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))["model_config"]
    if "codebook_size" not in d:
        raise ValueError(f"{directory} holds a {sorted(d)[:6]}... config, not a tokenizer's (no codebook_size): "
                         f"is it a decoder checkpoint?")
    kind = VideoVQConfig if video_vq.is_video_config_dict(d) else VQConfig
    fields = {f.name for f in dataclasses.fields(kind)}
    # Derived values stored beside the fields (e.g. grid_shape) are not fields.
    return kind.from_dict({k: v for k, v in d.items() if k in fields})


def load(path, cfg: Optional[AnyConfig] = None, *, codes_dir: str = "") -> AnyModel:
    """A trained tokenizer from a checkpoint directory (an export or one training step) or a training workdir (its
    latest step): a VideoVQModel when the checkpoint holds a video tokenizer, a VQModel otherwise.

    cfg: None uses the checkpoint's own config; otherwise it must agree with it except in runtime fields
    (dtype, dropout, image_size), e.g. to encode in bfloat16. A mismatch (say a different codebook dimension) is an
    error listing every differing field.
    codes_dir: the codes a decoder trained on (`par_jax.data.pipeline.training_codes_dir(config)`); when given, the
    tokenizer must be the one they were extracted with (`check_codes_tokenizer`).
    """
    directory = _checkpoint_dir(epath.Path(path))
    saved = read_config(directory)
    if cfg is None:
        cfg = saved
    elif type(cfg) is not type(saved):
        raise ValueError(f"tokenizer checkpoint {directory} holds a {type(saved).__name__}, but a "
                         f"{type(cfg).__name__} was requested (an image tokenizer cannot load a video one, nor the "
                         f"reverse).")
    else:
        diffs = [f"{f.name}: checkpoint {getattr(saved, f.name)!r} vs requested {getattr(cfg, f.name)!r}"
                 for f in dataclasses.fields(type(cfg))
                 if f.name not in RUNTIME_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)]
        if diffs:
            raise ValueError(f"tokenizer checkpoint {directory} does not match the requested config:\n  "
                             + "\n  ".join(diffs))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(state))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        params = ckptr.restore(directory, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    logging.info("tokenizer loaded from %s", directory)
    model = nnx.merge(graphdef, params)
    if codes_dir:
        check_codes_tokenizer(model, codes_dir)
    return model


def fingerprint(model: AnyModel) -> str:
    """A short digest of the tokenizer's codebook: two tokenizers that map codes to different vectors differ here.
    Recorded in a codes directory's metadata by the extract_codes job."""
    codebook = np.asarray(jax.device_get(model.quantize.embedding[...]), np.float32)
    return hashlib.sha256(codebook.tobytes()).hexdigest()[:16]


def check_codes_tokenizer(model: AnyModel, codes_dir: str, where: str = "") -> None:
    """Raise if `model` is not the tokenizer that made the codes in `codes_dir` (its metadata records a fingerprint
    since the extract_codes job wrote one; older codes are not checked). Decoding samples of a decoder trained on
    those codes with another tokenizer gives pictures that look plausible and are wrong."""
    from par_jax.data import codes as codes_lib  # noqa: PLC0415
    meta = codes_lib.CodesMetadata.load(codes_dir)
    recorded = meta.extra.get("tokenizer_fingerprint", "")
    if recorded and recorded != fingerprint(model):
        raise ValueError(f"the tokenizer used to decode{where} (fingerprint {fingerprint(model)}) is not the one the "
                         f"training codes in {codes_dir} were extracted with ({meta.tokenizer!r}, fingerprint "
                         f"{recorded}): decode with that tokenizer (--config.sample.tokenizer=PATH).")
