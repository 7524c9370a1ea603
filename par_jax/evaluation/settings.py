"""The evaluation protocol as one frozen value: `EvalSettings.from_config(config, **overrides)` reads `config.eval`
(plus how reference images are viewed, from `config.data`, and the tokenizer path) once, at the edge, and checks it.
Everything below takes the typed settings, never the ConfigDict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from par_jax.evaluation import metrics

LABEL_MODES = ("uniform", "balanced")
REFERENCE_STATS = ("stored", "computed")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What is measured and how (PAR_SPEC section 11; the fields of `config.eval`, docs/evaluation.md)."""
    metrics: tuple[str, ...] = ("fid", "sfid", "is", "precision_recall")
    name: str = ""                   # results folder WORKDIR/eval/<name> (the evaluate job)
    checkpoint: str = ""             # the evaluate job's checkpoint ("" = config.sample.checkpoint, else WORKDIR)
    samples: str = ""                # score this ADM .npz instead of sampling
    num_samples: int = 50_000
    batch_size: int = 64
    seed: int = 0
    labels: str = "uniform"          # LABEL_MODES
    resolution: int = 256            # 0 = keep the decoded size
    feature_network: str = "inception"
    inception_weights: str = ""
    i3d_weights: str = ""            # the Kinetics-400 I3D weight file (feature_network="i3d", FVD)
    classifier: str = "workdirs/fmnist_classifier"
    feature_batch_size: int = 64
    reference: str = ""              # an ADM reference .npz or an image source spec
    reference_split: str = "test"
    reference_count: int = 0         # 0 = all
    reference_stats: str = "stored"  # REFERENCE_STATS
    pr_k: int = 3
    is_split_size: int = 5000
    fid_min_samples: int = 0
    grid_images: int = 64
    save_npz: bool = True
    # From config.data / config.sample: how reference images are viewed, and the tokenizer that decodes samples.
    reference_views: str = "center"
    reference_image_size: int = 256
    tokenizer: str = ""

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in metrics.METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"config.eval.metrics={','.join(self.metrics)!r}: unknown or no metrics {unknown}; "
                             f"choose from {sorted(metrics.METRICS)} (comma-separated).")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"config.eval.labels={self.labels!r}: unknown label mode; choose one of {LABEL_MODES}.")
        if self.reference_stats not in REFERENCE_STATS:
            raise ValueError(f"config.eval.reference_stats must be one of {REFERENCE_STATS}, got "
                             f"{self.reference_stats!r}.")
        for name in ("num_samples", "batch_size", "feature_batch_size", "pr_k", "is_split_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.eval.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("resolution", "reference_count", "fid_min_samples", "grid_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"config.eval.{name} must be >= 0, got {getattr(self, name)}.")

    @classmethod
    def from_config(cls, config, **overrides) -> "EvalSettings":
        """From an experiment config: `config.eval` with `overrides` (fields of config.eval; anything else is an
        error), `config.data.views` / `image_size` for reference images, and the tokenizer
        (`config.sample.tokenizer`, else `config.data.tokenizer`)."""
        ec = dict(config.eval)
        unknown = sorted(set(overrides) - set(ec))
        if unknown:
            raise ValueError(f"unknown evaluation settings {unknown}; they must be fields of config.eval: "
                             f"{sorted(ec)}.")
        ec.update(overrides)
        data, sample = config.get("data") or {}, config.get("sample") or {}
        values: dict[str, Any] = {f.name: ec[f.name] for f in dataclasses.fields(cls) if f.name in ec}
        values["metrics"] = parse_metrics(ec.get("metrics", ",".join(cls.metrics)))
        values["reference_views"] = str(data.get("views", cls.reference_views))
        values["reference_image_size"] = int(data.get("image_size", cls.reference_image_size))
        values["tokenizer"] = str(sample.get("tokenizer", "") or data.get("tokenizer", "") or "")
        for f in dataclasses.fields(cls):  # ConfigDict values arrive as their declared Python types
            if f.name in values and f.type in ("int", "str", "bool"):
                values[f.name] = {"int": int, "str": str, "bool": bool}[f.type](values[f.name])
        return cls(**values)

    def replace(self, **changes) -> "EvalSettings":
        return dataclasses.replace(self, **changes)

    @property
    def min_samples(self) -> int | None:
        """The smallest sample count FID accepts (None: more samples than feature dimensions)."""
        return self.fid_min_samples or None

    def require_tokenizer(self) -> str:
        if not self.tokenizer:
            raise ValueError("evaluation decodes samples to images and needs a tokenizer: set "
                             "--config.data.tokenizer (the one the training codes were extracted with) or "
                             "--config.sample.tokenizer.")
        return self.tokenizer


def parse_metrics(spec) -> tuple[str, ...]:
    """'fid, is' -> ('fid', 'is'); a tuple or list passes through."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    return tuple(m.strip() for m in items if m.strip())
