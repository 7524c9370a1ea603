"""Decoder configuration: named sizes (PAR_SPEC section 6) and everything else a model needs, as one frozen dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from par_jax import ordering
from par_jax.model import attention as attention_lib

# layers, heads, dim. Head dim = dim / heads; MLP hidden derived from dim (see `mlp_hidden`).
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 2, 64),      # tests and CPU demos
    "small": (6, 6, 384),    # the Fashion-MNIST demo
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XXL": (48, 24, 1536),
    "3B": (24, 32, 3200),
}

REMAT_POLICIES = ("none", "full", "dots")


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the decoder's parameters and computation. Hashable: usable as a static jit argument."""
    num_layers: int
    num_heads: int
    dim: int
    vocab_size: int = 16384
    num_classes: int = 1000
    grid_shape: tuple[int, ...] = (24, 24)
    n: int = 4
    order_kind: str = "region"          # "region" | "raster_multi" (ablation)
    sequential_prefix: bool = True      # False: ablation with no initial sequential tokens
    intra_group: str = "full"           # "full" | "causal" (ablation)
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # The release gives the class and transition positions an all-zero cos/sin table (q = k = 0 there). Released
    # weights depend on it; False uses the identity rotation instead (for new models).
    zero_rope_special: bool = True
    embed_dropout: float = 0.1          # on the input embedding sequence
    resid_dropout: float = 0.1          # after the attention output projection
    mlp_dropout: float = 0.1            # after the MLP
    attn_dropout: float = 0.0           # attention probabilities: 0 in the release, 0.1 in the paper
    # Training attention (par_jax/model/attention.py): "auto" (splash on TPU, dot_product on GPU, xla on the CPU;
    # xla when attn_dropout > 0) | "xla" (the reference) | "dot_product" | "splash". Cached sampling is not affected.
    attention: str = "auto"
    class_dropout: float = 0.1          # label -> null class (also sizes the class table: num_classes + 1 rows)
    init_std: float = 0.02
    dtype: str = "bfloat16"             # compute dtype; parameters are always float32
    scan_layers: bool = True
    remat: str = "none"                 # "none" | "full" | "dots"

    def __post_init__(self):
        object.__setattr__(self, "grid_shape", tuple(int(g) for g in self.grid_shape))
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}.")
        pairs = self.head_dim // 2
        if self.head_dim % 2 or pairs < len(self.grid_shape):
            raise ValueError(f"head_dim={self.head_dim} must be even with at least one rotary pair per grid axis.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose one of {REMAT_POLICIES}.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown compute dtype {self.dtype!r}; use float32, bfloat16 or float16.")
        attention_lib.check(self.attention, self.attn_dropout)
        if self.vocab_size < 1 or self.num_classes < 1:
            raise ValueError("vocab_size and num_classes must be positive.")
        self.order  # validates grid and n

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return _round_up(int(2 * 4 * self.dim / 3), self.multiple_of)

    @property
    def num_tokens(self) -> int:
        return self.order.num_tokens

    @property
    def order(self) -> ordering.OrderSpec:
        return ordering.OrderSpec(self.grid_shape, self.n, kind=self.order_kind,
                                  sequential_prefix=self.sequential_prefix, intra_group=self.intra_group)

    @property
    def layout(self) -> ordering.SequenceLayout:
        return self.order.layout

    @property
    def num_transition(self) -> int:
        return self.n - 1

    @property
    def null_class(self) -> int:
        """Row of the class table used for classifier-free guidance and label dropout."""
        return self.num_classes

    def replace(self, **kwargs) -> "ModelConfig":
        return dataclasses.replace(self, **kwargs)


def model_config(size: str = "B", **overrides: Any) -> ModelConfig:
    """A ModelConfig for a named size with field overrides, e.g. model_config("XL", n=4, grid_shape=(24, 24))."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}.")
    layers, heads, dim = SIZES[size]
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model config fields {unknown}; known fields: {sorted(fields)}.")
    base = dict(num_layers=layers, num_heads=heads, dim=dim)
    base.update(overrides)
    return ModelConfig(**base)


def from_config_dict(cfg: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from an ml_collections `config.model` block: a `size` key plus field overrides."""
    d = dict(cfg)
    size = d.pop("size", "B")
    if "grid_shape" in d:
        d["grid_shape"] = tuple(d["grid_shape"])
    return model_config(size, **d)
