"""Token layout: stage maps compose to nearest upsampling, positions end on the native fine grid."""
import pytest
import torch

from ralu_runtime.layout import TokenLayout, grid_positions


def nearest_up_tokens(x, hc, wc):
    """(B, Hc*Wc, C) coarse raster tokens -> (B, 4 Hc Wc, C) fine raster tokens by nearest upsampling."""
    b, _, c = x.shape
    grid = x.view(b, hc, wc, c).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(grid, scale_factor=2, mode="nearest")
    return up.permute(0, 2, 3, 1).reshape(b, 4 * hc * wc, c)


def random_selection(b, m, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(b)])


@pytest.mark.parametrize("hc,wc", [(1, 1), (3, 5), (4, 4), (6, 2)])
@pytest.mark.parametrize("frac", [0.0, 0.1, 0.5, 1.0])
def test_maps_compose_to_nearest_upsampling(hc, wc, frac):
    b, m = 3, hc * wc
    k = int(m * frac)
    lay = TokenLayout((hc, wc), random_selection(b, m, k, seed=hc * 31 + wc))
    x = torch.randn(b, m, 5)
    t12, t23 = lay.transition_12(), lay.transition_23()
    assert t12.src_index.shape == (b, lay.stage_lengths[1])
    stage2 = torch.gather(x, 1, t12.src_index.long()[..., None].expand(-1, -1, 5))
    stage3 = torch.gather(stage2, 1, t23.src_index.long()[..., None].expand(-1, -1, 5))
    assert torch.equal(stage3, nearest_up_tokens(x, hc, wc))


def _positions_after(pos, tmap):
    """Position rule of the stage transition (mirrors the kernel contract)."""
    src = torch.gather(pos, 1, tmap.src_index.long()[..., None].expand(-1, -1, 2))
    q = tmap.child.long()
    off = torch.stack([torch.div(q, 2, rounding_mode="floor"), q % 2], -1).float() * 0.5
    off = torch.where((q >= 0)[..., None], off, torch.zeros_like(off))
    return tmap.pos_scale * (src + off)


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_positions_stage2_children_and_stage3_native(frac):
    hc, wc, b = 4, 6, 2
    m = hc * wc
    k = int(m * frac)
    lay = TokenLayout((hc, wc), random_selection(b, m, k, seed=7))
    pos1 = lay.stage1_positions()
    pos2 = _positions_after(pos1, lay.transition_12())
    parent = lay.stage2_parent()
    # children sit at parent + {0, 0.5}^2, coarse tokens at their own coarse position
    parent_pos = grid_positions(hc, wc)[parent]
    delta = pos2 - parent_pos
    fine = lay.stage2_fine_mask()
    assert torch.all(delta[~fine] == 0)
    assert set(map(tuple, delta[fine].tolist())) <= {(0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5)}
    pos3 = _positions_after(pos2, lay.transition_23())
    assert torch.equal(pos3, lay.stage3_positions())
    assert torch.equal(pos3[0], grid_positions(2 * hc, 2 * wc))


def test_noise_groups_are_consistent():
    hc, wc, b = 3, 4, 2
    m = hc * wc
    lay = TokenLayout((hc, wc), random_selection(b, m, 5, seed=3))
    for tmap in (lay.transition_12(), lay.transition_23()):
        assert int(tmap.group.max()) < tmap.num_groups
        for i in range(b):
            g, q = tmap.group[i].long(), tmap.child[i].long()
            # kept tokens own their group; upsampled groups hold exactly children 0..3
            kept = g[q < 0]
            assert kept.unique().numel() == kept.numel()
            assert not set(kept.tolist()) & set(g[q >= 0].tolist())
            for grp in g[q >= 0].unique():
                assert sorted(q[g == grp].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("hc,wc,k", [(1, 1, 0), (1, 1, 1), (3, 4, 5), (4, 6, 0), (4, 6, 24)])
def test_work_order_is_group_major(hc, wc, k):
    """The layout's kernel work order passes the kernels' validation and equals the generic one."""
    from ralu_kernels import transition as T

    b = 2
    lay = TokenLayout((hc, wc), random_selection(b, hc * wc, k, seed=k + 7))
    for tmap, n_up in ((lay.transition_12(), k), (lay.transition_23(), hc * wc - k)):
        assert tmap.num_up == n_up and tmap.order.dtype == torch.int32
        T._check_order(tmap.order, tmap.num_up, tmap.src_index, tmap.group, tmap.child)
        # same groups in the same sequence as the sort-based order (both sort upsampled groups by group id)
        order, num_up = T.group_major_order(tmap.src_index, tmap.group, tmap.child)
        assert num_up == tmap.num_up
        assert torch.equal(order[:, : 4 * num_up], tmap.order[:, : 4 * num_up])
        assert torch.equal(order[:, 4 * num_up:].sort(1).values, tmap.order[:, 4 * num_up:].sort(1).values)


def test_selection_validation():
    with pytest.raises(ValueError, match="unique"):
        TokenLayout((2, 2), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        TokenLayout((2, 2), torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="cannot select"):
        TokenLayout((2, 2), torch.zeros(1, 5, dtype=torch.long))
    lay = TokenLayout((2, 3), torch.tensor([[5, 0]]))
    assert lay.selected.tolist() == [[0, 5]]
    assert lay.selected_mask().tolist() == [[[True, False, False], [False, False, True]]]
