"""Token orders, sequence layout and the block-causal mask against PAR_SPEC sections 2-4."""

import itertools

import numpy as np
import pytest

from par_jax import ordering
from par_jax.ordering import OrderSpec


def rc(grid_w, idx):
    return [divmod(int(i), grid_w) for i in idx]


def test_golden_region_order_24x24_n4():
    order = ordering.region_order((24, 24), 4)
    assert rc(24, order[:8]) == [(0, 0), (0, 12), (12, 0), (12, 12), (0, 1), (0, 13), (12, 1), (12, 13)]


def test_golden_region_order_24x24_n16():
    order = ordering.region_order((24, 24), 16)
    first = rc(24, order[:16])
    assert first[:5] == [(0, 0), (0, 6), (0, 12), (0, 18), (6, 0)]
    assert first[-1] == (18, 18)
    assert first == [(a * 6, b * 6) for a in range(4) for b in range(4)]
    assert rc(24, order[16:18]) == [(0, 1), (0, 7)]


def test_n1_is_raster_order_and_plain_causal_mask():
    np.testing.assert_array_equal(ordering.region_order((16, 16), 1), np.arange(256))
    mask = ordering.block_causal_mask((16, 16), 1)
    assert mask.shape == (256, 256)
    np.testing.assert_array_equal(mask, np.tril(np.ones((256, 256), bool)))


@pytest.mark.parametrize("grid,n,steps", [
    ((24, 24), 1, 576), ((24, 24), 4, 147), ((24, 24), 16, 51),
    ((16, 16), 4, 67), ((16, 16), 16, 31),
    ((5, 16, 16), 4, 323), ((5, 16, 16), 16, 95),
])
def test_golden_step_counts(grid, n, steps):
    assert ordering.num_steps(grid, n) == steps
    n_tok = int(np.prod(grid))
    assert steps == n + (n_tok - n) // n
    # The step bounds cover every predicting position exactly once.
    bounds = OrderSpec(grid, n).layout.step_bounds()
    assert len(bounds) == steps
    assert bounds[0] == (0, 1) and bounds[-1][1] == n_tok
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_ablation_orders_step_counts():
    # "No initial sequential tokens": the first group is parallel too, 144 steps at 24x24, n=4.
    assert ordering.num_steps((24, 24), 4, sequential_prefix=False) == 144
    spec = OrderSpec((24, 24), 4, kind="raster_multi")
    np.testing.assert_array_equal(spec.perm, np.arange(576))
    assert spec.layout.num_steps == 147


def test_mask_rows_n4():
    mask = ordering.block_causal_mask((24, 24), 4)
    assert mask.shape == (579, 579)
    assert mask.sum(1)[:10].tolist() == [1, 2, 3, 4, 8, 8, 8, 8, 12, 12]
    # Later groups: every group of 4 sees everything before it and itself.
    assert mask.sum(1)[12:16].tolist() == [16] * 4


def test_mask_causal_inside_group_ablation():
    mask = ordering.block_causal_mask((24, 24), 4, intra_group="causal")
    assert mask.sum(1)[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    np.testing.assert_array_equal(mask, np.tril(np.ones_like(mask)))


def test_sequence_layout_n4():
    layout = OrderSpec((8, 8), 4).layout
    n, n_tok = 4, 64
    assert layout.seq_len == n_tok + n - 1
    k, i = layout.input_kind, layout.input_index
    assert k[0] == ordering.CLS
    # [cls] t_0..t_3 M_1..M_3 t_4 .. t_62
    assert (k[1:5] == ordering.TOKEN).all() and i[1:5].tolist() == [0, 1, 2, 3]
    assert (k[5:8] == ordering.TRANSITION).all() and i[5:8].tolist() == [0, 1, 2]
    assert (k[8:] == ordering.TOKEN).all() and i[8:].tolist() == list(range(4, 63))
    # Position p >= 2n holds t_{p-n} and predicts t_p: offset n, i.e. the same region one group later.
    def region(r):
        return (r // 8) // 4, (r % 8) // 4
    for p in range(2 * n, n_tok):
        assert i[p] == p - n
        assert region(layout.perm[p]) == region(layout.perm[i[p]])


def test_no_prefix_layout():
    layout = OrderSpec((8, 8), 4, sequential_prefix=False).layout
    assert layout.seq_len == 64
    assert layout.input_kind[:4].tolist() == [ordering.CLS] + [ordering.TRANSITION] * 3
    assert layout.attention_mask().sum(1)[:8].tolist() == [4, 4, 4, 4, 8, 8, 8, 8]


def _supported(grid):
    h, w = grid[-2:]
    return [s * s for s in range(1, min(h, w) + 1) if h % s == 0 and w % s == 0]


@pytest.mark.parametrize("grid", [(24, 24), (16, 16), (8, 8), (12, 8), (6, 10), (5, 16, 16), (3, 4, 6), (1, 4, 4)])
def test_inverse_round_trips_for_every_supported_n(grid):
    n_tok = int(np.prod(grid))
    x = np.random.default_rng(0).permutation(n_tok) * 7 + 3
    for n in _supported(grid):
        order = ordering.region_order(grid, n)
        assert sorted(order.tolist()) == list(range(n_tok))
        inv = ordering.inverse_permutation(order)
        np.testing.assert_array_equal(x[order][inv], x)
        np.testing.assert_array_equal(order[inv], np.arange(n_tok))


@pytest.mark.parametrize("grid,n", [((24, 24), 4), ((24, 24), 16), ((12, 8), 4), ((5, 16, 16), 4), ((4, 8, 8), 16)])
def test_each_parallel_group_takes_one_token_per_region_at_the_same_offset(grid, n):
    s = int(np.sqrt(n))
    h, w = grid[-2:]
    coords = np.stack(np.unravel_index(ordering.region_order(grid, n), grid), -1)
    for g in range(len(coords) // n):
        group = coords[g * n:(g + 1) * n]
        regions = {(r // (h // s), c // (w // s)) for r, c in group[:, -2:]}
        assert len(regions) == n
        offsets = {tuple(x) for x in np.concatenate([group[:, :-2], group[:, -2:] % [h // s, w // s]], 1)}
        assert len(offsets) == 1
    # Video: a region spans all frames; frames are outermost among in-region positions.
    if len(grid) == 3:
        assert (np.diff(coords[:, 0]) >= 0).all()


def test_step_map_counts_and_first_group():
    spec = OrderSpec((8, 8), 4)
    steps = ordering.step_map(spec)
    assert steps.shape == (8, 8)
    # 4 sequential steps of one token, then every later step fills one cell of each of the 4 regions.
    values, counts = np.unique(steps, return_counts=True)
    assert values.tolist() == list(range(spec.layout.num_steps))
    assert counts.tolist() == [1, 1, 1, 1] + [4] * (len(values) - 4)
    assert [steps[0, 0], steps[0, 4], steps[4, 0], steps[4, 4]] == [0, 1, 2, 3]


@pytest.mark.parametrize("grid,n,needle", [
    ((24, 24), 3, "not a perfect square"),
    ((24, 24), 25, "does not divide"),
    ((10, 10), 9, "Values of n that fit this grid: [1, 4, 25, 100]"),
    ((24, 24), 0, "positive integer"),
    ((24,), 4, "grid_shape must be"),
    ((0, 4), 1, "grid_shape must be"),
])
def test_impossible_orders_raise_clear_errors(grid, n, needle):
    with pytest.raises(ValueError) as err:
        ordering.region_order(grid, n)
    assert needle in str(err.value)


def test_bad_order_options():
    with pytest.raises(ValueError, match="unknown order kind"):
        OrderSpec((8, 8), 4, kind="zigzag")
    with pytest.raises(ValueError, match="intra_group"):
        OrderSpec((8, 8), 4, intra_group="sparse")
    with pytest.raises(ValueError, match="raster_multi needs n to divide"):
        OrderSpec((5, 5), 4, kind="raster_multi")
    with pytest.raises(ValueError, match="not a permutation"):
        ordering.inverse_permutation(np.array([0, 0, 1]))


def test_layout_arrays_are_read_only_and_cached():
    layout = OrderSpec((8, 8), 4).layout
    assert layout is OrderSpec((8, 8), 4).layout
    for name in ("perm", "inverse", "input_kind", "input_index", "group"):
        with pytest.raises(ValueError):
            getattr(layout, name)[0] = 1


def test_positions_follow_generation_order():
    layout = OrderSpec((6, 6), 4).layout
    pos = layout.positions()
    for p, (kind, j) in enumerate(zip(layout.input_kind, layout.input_index)):
        if kind == ordering.TOKEN:
            assert tuple(pos[p]) == divmod(int(layout.perm[j]), 6)
        else:
            assert tuple(pos[p]) == (0, 0)
    assert list(itertools.islice(layout.group, 6)) == [0, 1, 2, 3, 4, 4]
