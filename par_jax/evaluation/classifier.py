"""A small Fashion-MNIST classifier, trained by the project, as the offline feature network for the demo.

The standard FID Inception weights cannot be fetched everywhere, and Inception features of 28x28 clothing are a poor
judge anyway, so the Fashion-MNIST demo scores its samples with this CNN instead: its penultimate layer (128-d) gives
FID / precision / recall features and its logits give an Inception-Score analogue and class consistency (accuracy on
generated images against the labels they were generated for). These numbers are comparable between runs of this
project that use the same classifier checkpoint, and NOT with any published ImageNet FID/IS.

Input: images as the demo generates them, uint8 (B, H, W, 3) with Fashion-MNIST's 28x28 picture zero-padded to
32x32 (the data pipeline's "pad" view); channels are averaged to grey and other sizes are resized to 32x32.
Training places the 28x28 picture at a random offset inside the 32x32 canvas (shifts of up to 2 pixels), so small
misplacements in generated images do not change the prediction.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from par_jax.data import sources
from par_jax.core import checkpoint, loop
from par_jax.core.config_args import UsageError

IMAGE_SIZE = 32
NUM_CLASSES = 10
FEATURE_DIM = 128


class Classifier(nnx.Module):
    """conv16 - pool - conv32 - pool - conv64 - dense128 (features) - dense10 (logits); small enough for a CPU."""

    def __init__(self, *, rngs: nnx.Rngs, dropout: float = 0.3):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.dense = nnx.Linear(8 * 8 * 64, FEATURE_DIM, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

    def __call__(self, images) -> dict[str, jax.Array]:
        """uint8 or [0, 255] float images (B, H, W, C) -> {"pool": (B, 128), "logits": (B, 10)}."""
        x = preprocess(images)
        x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), (2, 2))
        x = jax.nn.relu(self.conv3(x))
        features = jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))
        return {"pool": features, "logits": self.head(self.dropout(features))}


def preprocess(images):
    """(B, H, W, C) in [0, 255] -> grey (B, 32, 32, 1) in [-1, 1]."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"the classifier takes images (batch, height, width, 1 or 3) in [0, 255]; got shape "
                         f"{tuple(images.shape)}.")
    x = jnp.mean(images.astype(jnp.float32), axis=-1, keepdims=True) / 127.5 - 1.0
    if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), "linear")
    return x


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train" | "test") as grey uint8 (N, 28, 28) and int32 labels (N,)."""
    source = sources.fashion_mnist_files(split)
    images = np.stack([source[i][0][..., 0] for i in range(len(source))])
    labels = np.asarray([source[i][1] for i in range(len(source))], np.int32)
    return images, labels


def place(images28: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
    """(N, 28, 28) grey -> (N, 32, 32, 3) uint8 canvases; picture at `offsets` (N, 2) (default: centred, 2 px)."""
    n, h, w = images28.shape
    pad = IMAGE_SIZE - h
    if offsets is None:
        offsets = np.full((n, 2), pad // 2)
    out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for (dy, dx) in np.unique(offsets, axis=0):
        rows = np.all(offsets == (dy, dx), axis=1)
        out[rows, dy:dy + h, dx:dx + w] = images28[rows]
    return np.repeat(out[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    log_every: int = 200


def _loss(model, x, labels):
    logits = model(x)["logits"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


@nnx.jit
def _train_step(model, optimizer, x, labels):
    (loss, acc), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x, labels)
    optimizer.update(model, grads)
    return loss, acc


@nnx.jit
def _logits(model, x):
    return model(x)["logits"]


Reader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # indices -> (uint8 inputs, int labels)


def fit(model: nnx.Module, settings, next_batch: Callable[[], tuple[np.ndarray, np.ndarray]], *, name: str,
        inputs: str) -> list[dict[str, float]]:
    """The loop both evaluation classifiers (image and video) train with: AdamW on a cosine schedule, cross-entropy
    on `model(x)["logits"]`, a finiteness check and a progress line every `settings.log_every` steps. Returns the
    loss history; the model is left in eval mode."""
    schedule = optax.cosine_decay_schedule(settings.learning_rate, settings.steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=settings.weight_decay), wrt=nnx.Param)
    model.train()
    history, start = [], time.time()
    for step in range(1, settings.steps + 1):
        x, labels = next_batch()
        loss, acc = _train_step(model, optimizer, jnp.asarray(x), jnp.asarray(labels))
        if step % settings.log_every == 0 or step == settings.steps:
            # The loop kit's guard: the model returned here is saved by load_or_train, so its state is checked too.
            loop.check_finite(step, {"loss": loss, "param_norm": optax.global_norm(nnx.state(model, nnx.Param))},
                              kept=lambda: "nothing was saved",
                              hint=f"Lower TrainSettings.learning_rate or check the training {inputs}.")
            rate = step / (time.time() - start)
            history.append({"step": step, "loss": float(loss), "accuracy": float(acc)})
            logging.info("%s step %d/%d: loss %.4f, batch accuracy %.3f, %.2f steps/s, ETA %.0fs", name, step,
                         settings.steps, float(loss), float(acc), rate, (settings.steps - step) / rate)
    model.eval()
    return history


def accuracy_of(model: nnx.Module, read: Reader, count: int, batch_size: int) -> float:
    """Top-1 accuracy over the first `count` examples that `read` gives."""
    model.eval()
    correct = 0
    for start in range(0, count, batch_size):
        x, labels = read(np.arange(start, min(start + batch_size, count)))
        correct += int(jnp.sum(jnp.argmax(_logits(model, jnp.asarray(x)), -1) == jnp.asarray(labels)))
    return correct / count


def accuracy(model: Classifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy on uint8 (N, H, W, C) images."""
    return accuracy_of(model, lambda index: (images[index], labels[index]), len(images), batch_size)


def train(settings: TrainSettings = TrainSettings(), *, data: tuple[np.ndarray, np.ndarray] | None = None
          ) -> tuple[Classifier, list[dict[str, float]]]:
    """Train on Fashion-MNIST train (or `data` = grey (N, 28, 28) uint8, labels); returns (model, loss history)."""
    images, labels = load_split("train") if data is None else data
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(labels) != len(images):
        raise ValueError(f"training data must be grey (N, 28, 28) images with (N,) labels; got {images.shape}, "
                         f"{np.shape(labels)}.")
    rng = np.random.default_rng(settings.seed)
    model = Classifier(rngs=nnx.Rngs(settings.seed))
    epoch = {"order": rng.permutation(len(images)), "pos": 0}

    def next_batch():  # epochs of a fresh permutation; each picture at a random offset in its canvas
        if epoch["pos"] + settings.batch_size > len(epoch["order"]):
            epoch["order"], epoch["pos"] = rng.permutation(len(images)), 0
        idx = epoch["order"][epoch["pos"]:epoch["pos"] + settings.batch_size]
        epoch["pos"] += settings.batch_size
        return place(images[idx], rng.integers(0, IMAGE_SIZE - 28 + 1, (len(idx), 2))), labels[idx]

    return model, fit(model, settings, next_batch, name="classifier", inputs="images")


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------

def save(directory, model: Classifier, metadata: dict[str, Any]) -> epath.Path:
    """Write params + a JSON record (test accuracy, training settings) to `directory`, which must not exist."""
    directory = checkpoint.as_path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; remove it or choose another directory.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(directory, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
            metadata=ocp.args.JsonSave(metadata)))
    return directory


def restore(directory, make: Callable[[], nnx.Module], *, kind: str, name: str, command: str
            ) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode, metadata) from a directory written by `save`. `make` builds the network (abstractly
    here); a folder of another `kind` of classifier is refused by `name` before any parameter is read, and a missing
    one names the `command` that trains it."""
    directory = checkpoint.as_path(directory)
    if not (directory / "params").exists():
        raise FileNotFoundError(f"no {name} in {directory}; train one with `python -m {command} --out={directory}` "
                                f"or let `load_or_train` do it.")
    graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    # Explicit device: under a training loop's `jax.set_mesh`, abstract shapes carry that mesh's abstract sharding.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(params))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        metadata = ckptr.restore(directory, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
        found = metadata.get("kind", "image_classifier")  # image classifiers saved before kinds existed have none
        if found != kind:
            raise UsageError(f"{directory} holds another kind of classifier ({found}), not the {name}: point "
                             f"config.eval.classifier at a {name}'s folder.")
        restored = ckptr.restore(directory, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    nnx.replace_by_pure_dict(params, restored["params"])
    rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, rest)
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return model, dict(metadata)


def load(directory) -> tuple[Classifier, dict[str, Any]]:
    """(model in eval mode, metadata) from a directory written by `save`."""
    return restore(directory, lambda: Classifier(rngs=nnx.Rngs(0)), kind="image_classifier",
                   name="Fashion-MNIST classifier", command="par_jax.evaluation.classifier")


def load_or_train(directory, settings: TrainSettings = TrainSettings()) -> tuple[Classifier, dict[str, Any]]:
    """The classifier saved in `directory`, training and saving it first (a few minutes on a CPU) if it is absent."""
    if (epath.Path(directory) / "params").exists():
        return load(directory)
    logging.info("training the Fashion-MNIST evaluation classifier into %s", directory)
    start = time.time()
    model, history = train(settings)
    test_images, test_labels = load_split("test")
    test_accuracy = accuracy(model, place(test_images), test_labels)
    metadata = {"test_accuracy": test_accuracy, "train_seconds": round(time.time() - start, 1),
                "train_settings": dataclasses.asdict(settings), "history": history,
                "data": "Fashion-MNIST train split (60k), tested on its test split (10k), 28x28 padded to 32x32",
                "backend": jax.default_backend()}
    logging.info("classifier test accuracy %.4f", test_accuracy)
    save(directory, model, metadata)
    return model, metadata


def _define_flags(fv, argv) -> None:
    from absl import flags  # noqa: PLC0415
    del argv
    flags.DEFINE_string("out", "workdirs/fmnist_classifier", "Where the classifier is (or is saved once trained).",
                        flag_values=fv)
    flags.DEFINE_integer("steps", TrainSettings.steps, "Training steps when it has to be trained.", flag_values=fv)


def main(argv=None) -> None:
    """`python -m par_jax.evaluation.classifier [--out=DIR] [--steps=N]`: train (or load) the Fashion-MNIST
    evaluation classifier and print its record."""
    from par_jax.core import config_args  # noqa: PLC0415
    f = config_args.parse_flags(argv, _define_flags, doc=main.__doc__)
    logging.set_verbosity(logging.INFO)
    _, metadata = load_or_train(f.out, TrainSettings(steps=f.steps))
    print(json.dumps({k: v for k, v in metadata.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    from par_jax.core import config_args
    config_args.run(main)
