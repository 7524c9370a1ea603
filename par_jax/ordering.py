"""Token orders, the training-sequence layout and the block-causal mask of PAR.

Everything here is plain NumPy on static shapes: orders and masks are data computed once (at trace time) and baked
into the compiled model and sampler as constants.

Vocabulary used everywhere in par_jax:
  grid_shape   (H, W) for images or (T, H, W) for video latents; N = prod(grid_shape) image tokens.
  n            tokens generated per parallel step (n = s*s regions; n = 1 is plain raster order, i.e. LlamaGen).
  order        `perm`, the raster indices of the tokens in generation order: t_j = raster token perm[j].
  sequence     the decoder input. For PAR (PAR_SPEC section 3):
                   [cls] t_0 .. t_{n-1} M_1 .. M_{n-1} t_n .. t_{N-2}          length L = N + n - 1
               The output at sequence position p < N predicts t_p; the trailing n - 1 outputs are unused.
  group        the forward step at which a sequence position is fed; positions of one group attend to each other
               (fully, or causally in the ablation) and to every earlier group.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

# What sits at each sequence position.
CLS, TOKEN, TRANSITION = 0, 1, 2

ORDER_KINDS = ("region", "raster_multi", "region_sequential")
INTRA_GROUP = ("full", "causal")


def _as_grid(grid_shape) -> tuple[int, ...]:
    grid = tuple(int(g) for g in grid_shape)
    if len(grid) not in (2, 3) or any(g <= 0 for g in grid):
        raise ValueError(
            f"grid_shape must be (H, W) for images or (T, H, W) for video with positive sizes, got {grid_shape!r}.")
    return grid


def regions_per_side(grid_shape, n: int) -> int:
    """s for n = s*s regions; checks that s divides both spatial sides of the grid."""
    grid = _as_grid(grid_shape)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (tokens per parallel step) must be a positive integer, got {n!r}.")
    s = math.isqrt(int(n))
    if s * s != n:
        lo, hi = s * s, (s + 1) ** 2
        raise ValueError(f"n={n} is not a perfect square: PAR splits the grid into s x s regions, so n must be one of "
                         f"1, 4, 9, 16, ... (nearest: {lo} or {hi}).")
    h, w = grid[-2:]
    if h % s or w % s:
        allowed = [k * k for k in range(1, min(h, w) + 1) if h % k == 0 and w % k == 0]
        raise ValueError(f"n={n} needs {s} regions per side, but {s} does not divide the {h}x{w} token grid. "
                         f"Values of n that fit this grid: {allowed}.")
    return s


def region_order(grid_shape, n: int) -> np.ndarray:
    """Raster indices of the tokens in PAR's generation order.

    For each in-region position in raster order, for each region in raster order: the token at that position of that
    region. Video grids (T, H, W) use spatial regions spanning all frames; the in-region position runs over
    (frame, row, col) in raster order. n = 1 gives the plain raster order.
    """
    grid = _as_grid(grid_shape)
    s = regions_per_side(grid, n)
    t = grid[0] if len(grid) == 3 else 1
    h, w = grid[-2:]
    rh, rw = h // s, w // s
    # raster[t, a, r, b, c] is the raster index of frame t, row a*rh + r, col b*rw + c.
    raster = np.arange(t * h * w).reshape(t, s, rh, s, rw)
    # Generation order: in-region position (t, r, c) outermost, then region (a, b).
    return raster.transpose(0, 2, 4, 1, 3).reshape(-1).astype(np.int32)


def raster_order(grid_shape) -> np.ndarray:
    grid = _as_grid(grid_shape)
    return np.arange(math.prod(grid), dtype=np.int32)


def inverse_permutation(perm) -> np.ndarray:
    """inv with inv[perm[j]] = j: maps a sequence in generation order back to raster order (x_raster = x_gen[inv])."""
    perm = np.asarray(perm)
    if perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(perm.size)):
        raise ValueError("not a permutation: expected every index 0..N-1 exactly once.")
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=perm.dtype)
    return inv


def num_steps(grid_shape, n: int, sequential_prefix: bool = True) -> int:
    """Forward passes to generate one image: n + (N - n)/n, or N/n without the sequential first group."""
    return OrderSpec(tuple(_as_grid(grid_shape)), n, sequential_prefix=sequential_prefix).layout.num_steps


@dataclasses.dataclass(frozen=True)
class OrderSpec:
    """A token order and its sequence layout, as data. Hashable, so it can be a static jit argument.

    kind:               "region" (PAR), "raster_multi" (ablation: n consecutive raster tokens per step) or
                        "region_sequential" (ablation: PAR's order over n regions, generated one token per step: the
                        layout of n = 1, N steps, plain causal attention; the model keeps n - 1 transition embeddings
                        that no position reads).
    sequential_prefix:  True (PAR) generates t_0 .. t_{n-1} one by one first; False is the ablation with no initial
                        sequential tokens (the first group is predicted in parallel from [cls] M_1 .. M_{n-1}).
    intra_group:        "full" (PAR) or "causal" (ablation) attention inside a parallel group.
    """
    grid_shape: tuple[int, ...]
    n: int = 1
    kind: str = "region"
    sequential_prefix: bool = True
    intra_group: str = "full"

    def __post_init__(self):
        object.__setattr__(self, "grid_shape", _as_grid(self.grid_shape))
        object.__setattr__(self, "n", int(self.n))
        if self.kind not in ORDER_KINDS:
            raise ValueError(f"unknown order kind {self.kind!r}; choose one of {ORDER_KINDS}.")
        if self.intra_group not in INTRA_GROUP:
            raise ValueError(f"unknown intra_group {self.intra_group!r}; choose one of {INTRA_GROUP}.")
        if self.kind in ("region", "region_sequential"):
            regions_per_side(self.grid_shape, self.n)
        if self.kind == "region_sequential" and not self.sequential_prefix:
            raise ValueError("region_sequential generates every token one at a time; sequential_prefix=False "
                             "(a parallel first group) does not apply to it.")
        elif self.n < 1 or self.num_tokens % self.n:
            raise ValueError(f"raster_multi needs n to divide the {self.num_tokens} tokens, got n={self.n}.")

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def perm(self) -> np.ndarray:
        return self.layout.perm

    @property
    def layout(self) -> "SequenceLayout":
        return _layout(self)


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceLayout:
    """Where everything sits in the decoder's input sequence (all arrays NumPy, length L unless said otherwise).

    perm          (N,) raster index of t_j.
    inverse       (N,) generation index of raster token i.
    input_kind    (L,) CLS, TOKEN or TRANSITION.
    input_index   (L,) for TOKEN: j of t_j; for TRANSITION: k - 1 for M_k (row of the transition table); else 0.
    group         (L,) forward step at which the position is fed (non-decreasing).
    The output at position p < N predicts t_p, so targets are simply the permuted tokens.
    """
    spec: OrderSpec
    perm: np.ndarray
    inverse: np.ndarray
    input_kind: np.ndarray
    input_index: np.ndarray
    group: np.ndarray

    @property
    def seq_len(self) -> int:
        return int(self.input_kind.size)

    @property
    def num_steps(self) -> int:
        """Groups that predict at least one token (the group of position N - 1 is the last one that is fed)."""
        return int(self.group[self.spec.num_tokens - 1]) + 1

    def step_bounds(self) -> list[tuple[int, int]]:
        """(start, end) sequence positions fed at each step; end is capped at N (later outputs are unused)."""
        n_tok = self.spec.num_tokens
        bounds = []
        for s in range(self.num_steps):
            idx = np.nonzero(self.group[:n_tok] == s)[0]
            bounds.append((int(idx[0]), int(idx[-1]) + 1))
        return bounds

    def positions(self) -> np.ndarray:
        """(L, len(grid_shape)) grid coordinates of the token at each position; zeros at class/transition positions."""
        coords = np.stack(np.unravel_index(self.perm, self.spec.grid_shape), axis=-1)
        pos = coords[self.input_index]
        return np.where((self.input_kind == TOKEN)[:, None], pos, 0).astype(np.int32)

    def attention_mask(self) -> np.ndarray:
        """(L, L) boolean, True where query position q may attend to key position k."""
        g = self.group
        earlier = g[None, :] < g[:, None]
        same = g[None, :] == g[:, None]
        if self.spec.intra_group == "full":
            return earlier | same
        pos = np.arange(g.size)
        return earlier | (same & (pos[None, :] <= pos[:, None]))


@functools.lru_cache(maxsize=64)
def _layout(spec: OrderSpec) -> SequenceLayout:
    n, n_tok = spec.n, spec.num_tokens
    perm = raster_order(spec.grid_shape) if spec.kind == "raster_multi" else region_order(spec.grid_shape, n)
    kind, index, group = [CLS], [0], []
    if spec.kind == "region_sequential":
        # [cls] t_0 .. t_{N-2}, one position per step: the layout of n = 1 over PAR's permutation.
        kind += [TOKEN] * (n_tok - 1)
        index += list(range(n_tok - 1))
        group = list(range(n_tok))
    elif spec.sequential_prefix:
        # [cls] t_0 .. t_{n-1} M_1 .. M_{n-1} t_n .. t_{N-2}
        kind += [TOKEN] * n + [TRANSITION] * (n - 1) + [TOKEN] * (n_tok - n - 1)
        index += list(range(n)) + list(range(n - 1)) + list(range(n, n_tok - 1))
        seq_len = len(kind)
        group = [p if p < n else n + (p - n) // n for p in range(seq_len)]
    else:
        # [cls] M_1 .. M_{n-1} t_0 .. t_{N-n-1}
        kind += [TRANSITION] * (n - 1) + [TOKEN] * (n_tok - n)
        index += list(range(n - 1)) + list(range(n_tok - n))
        seq_len = len(kind)
        group = [0 if p < n else 1 + (p - n) // n for p in range(seq_len)]
    layout = SequenceLayout(
        spec=spec, perm=perm, inverse=inverse_permutation(perm),
        input_kind=np.asarray(kind, np.int32), input_index=np.asarray(index, np.int32),
        group=np.asarray(group, np.int32))
    for name in ("perm", "inverse", "input_kind", "input_index", "group"):
        getattr(layout, name).setflags(write=False)
    return layout


def block_causal_mask(grid_shape, n: int, intra_group: str = "full", sequential_prefix: bool = True) -> np.ndarray:
    """(L, L) boolean mask over the training input sequence (class token first), True where a query may attend."""
    return OrderSpec(tuple(_as_grid(grid_shape)), n, intra_group=intra_group,
                     sequential_prefix=sequential_prefix).layout.attention_mask()


def step_map(spec: OrderSpec) -> np.ndarray:
    """grid_shape array: the forward step at which each grid cell is generated (for pictures of an order)."""
    layout = spec.layout
    # Position p predicts t_p, and t_p is produced by the step that feeds position p.
    steps_gen = layout.group[: spec.num_tokens]
    return steps_gen[layout.inverse].reshape(spec.grid_shape)
