"""Mixed-resolution token layout: which token sits where in each RALU stage.

Token grids (row-major "raster" order everywhere):

* coarse grid ``(Hc, Wc)``, ``M = Hc * Wc`` tokens: stage 1, and the un-upsampled tokens of stage 2;
* fine grid ``(2 Hc, 2 Wc)``, ``4 M`` tokens: stage 3.

Stage-2 order for image ``b``: the 4 children of each selected coarse token, parents in ascending
raster order, children in order ``q = 2 dy + dx``; then the remaining coarse tokens in ascending
raster order. Positions are ``(row, col)`` float32: coarse-grid units in stages 1-2 (children at
``parent + 0.5 * (dy, dx)``), fine-grid units in stage 3.

A :class:`TransitionMap` holds, per output token, the source token it copies, its noise group and
its child index, plus the group-major work order of the kernels; it is exactly the input contract of
:func:`ralu_kernels.transition.stage_transition`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TransitionMap:
    """Gather map of one stage transition, shapes ``(B, L_dst)``.

    ``src_index`` int32: source token of each output token; ``group`` int32: noise group (tokens of one
    group share correlated noise; kept tokens have a group of their own); ``child`` int8: ``q = 2 dy + dx``
    for a child of a token upsampled at this boundary, ``-1`` for a token that is only copied.
    ``pos_scale``: factor applied to positions (2.0 when switching to fine-grid units).
    ``order`` int32 ``(B, L_dst)``: output rows group-major (the 4 children ``q = 0..3`` of each of the
    ``num_up`` upsampled groups, then the copied tokens), the work order of the Triton/CUDA kernels.
    """

    src_index: torch.Tensor
    group: torch.Tensor
    child: torch.Tensor
    pos_scale: float
    num_groups: int
    order: torch.Tensor
    num_up: int


def grid_positions(h: int, w: int, *, device=None) -> torch.Tensor:
    """Integer ``(row, col)`` positions of an ``h x w`` grid in raster order: ``(h*w, 2)`` float32."""
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    return torch.stack([rows, cols], dim=-1)


class TokenLayout:
    """Per-image layout of the three RALU stages for a batch with ``k`` selected coarse tokens each.

    Args:
        coarse_hw: ``(Hc, Wc)`` coarse token grid.
        selected: ``(B, k)`` integer coarse raster indices of the tokens upsampled at the end of stage 1
            (any order, no duplicates; stored sorted).
    """

    def __init__(self, coarse_hw: tuple[int, int], selected: torch.Tensor):
        hc, wc = int(coarse_hw[0]), int(coarse_hw[1])
        if hc < 1 or wc < 1:
            raise ValueError(f"coarse grid must be at least 1x1, got {coarse_hw}")
        if selected.ndim != 2:
            raise ValueError(f"selected must be (batch, k), got shape {tuple(selected.shape)}")
        m = hc * wc
        b, k = selected.shape
        if k > m:
            raise ValueError(f"cannot select {k} of {m} coarse tokens")
        sel = torch.sort(selected.long(), dim=1).values
        if k and (int(sel.min()) < 0 or int(sel.max()) >= m):
            raise ValueError(f"selected indices must lie in [0, {m}), got range [{int(sel.min())}, {int(sel.max())}]")
        if k > 1 and bool((sel[:, 1:] == sel[:, :-1]).any()):
            raise ValueError("selected indices must be unique per image")
        device = sel.device
        is_sel = torch.zeros(b, m, dtype=torch.bool, device=device)
        is_sel.scatter_(1, sel, True)
        arange = torch.arange(m, device=device).expand(b, m)
        self.coarse_hw = (hc, wc)
        self.batch, self.k, self.num_coarse = b, k, m
        self.device = device
        self.selected = sel                                   # (B, k) sorted
        self.rest = arange[~is_sel].view(b, m - k)            # (B, M - k) sorted
        self.is_selected = is_sel                             # (B, M)
        # rank of each coarse token inside its stage-2 section (children section or coarse section)
        self._rank = torch.where(is_sel, is_sel.long().cumsum(1) - 1, (~is_sel).long().cumsum(1) - 1)

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def fine_hw(self) -> tuple[int, int]:
        return (2 * self.coarse_hw[0], 2 * self.coarse_hw[1])

    @property
    def stage_lengths(self) -> tuple[int, int, int]:
        """Token counts per image of stages 1, 2, 3: ``(M, 4k + M - k, 4M)``."""
        m, k = self.num_coarse, self.k
        return (m, 4 * k + (m - k), 4 * m)

    # ---- stage 1 -------------------------------------------------------------------------------------
    def stage1_positions(self) -> torch.Tensor:
        """``(B, M, 2)`` float32 coarse-grid positions."""
        return grid_positions(*self.coarse_hw, device=self.device).expand(self.batch, -1, -1).contiguous()

    # ---- stage 2 -------------------------------------------------------------------------------------
    def stage2_parent(self) -> torch.Tensor:
        """``(B, L2)`` int64: coarse raster index each stage-2 token belongs to."""
        return torch.cat([self.selected.repeat_interleave(4, dim=1), self.rest], dim=1)

    def stage2_fine_mask(self) -> torch.Tensor:
        """``(B, L2)`` bool: True for full-resolution (child) tokens of stage 2."""
        l2 = self.stage_lengths[1]
        mask = torch.zeros(self.batch, l2, dtype=torch.bool, device=self.device)
        mask[:, : 4 * self.k] = True
        return mask

    def transition_12(self) -> TransitionMap:
        """Map from stage-1 tokens (coarse raster) to stage-2 tokens (children first, then the rest)."""
        b, k, m = self.batch, self.k, self.num_coarse
        src = self.stage2_parent()
        child = torch.cat([
            torch.arange(4, device=self.device, dtype=torch.int8).repeat(k).expand(b, 4 * k),
            torch.full((b, m - k), -1, dtype=torch.int8, device=self.device),
        ], dim=1)
        # stage-2 order is already group-major: children parent by parent (q = 0..3), then the rest
        order = torch.arange(4 * k + (m - k), device=self.device, dtype=torch.int32).expand(b, -1).contiguous()
        return TransitionMap(src.int().contiguous(), src.int().contiguous(), child.contiguous(), 1.0, m, order, k)

    # ---- stage 3 -------------------------------------------------------------------------------------
    def transition_23(self) -> TransitionMap:
        """Map from stage-2 tokens to stage-3 tokens in fine raster order.

        Children of stage 2 are copied (child -1, noise group ``M + fine index``); the remaining
        coarse tokens are upsampled now (children q, noise group = their coarse index).
        """
        hc, wc = self.coarse_hw
        m, k = self.num_coarse, self.k
        fh, fw = 2 * hc, 2 * wc
        f = torch.arange(fh * fw, device=self.device)
        y, x = f // fw, f % fw
        parent = (y // 2) * wc + (x // 2)                     # (4M,)
        q = (y % 2) * 2 + (x % 2)
        sel_p = self.is_selected[:, parent]                   # (B, 4M)
        rank_p = self._rank[:, parent]
        src = torch.where(sel_p, 4 * rank_p + q, 4 * k + rank_p)
        group = torch.where(sel_p, m + f, parent.expand_as(src))
        child = torch.where(sel_p, torch.full_like(src, -1), q.expand_as(src)).to(torch.int8)
        # group-major order: the 4 fine rows of each coarse token still coarse (upsampled now), then the
        # 4 fine rows of each token upsampled at the first boundary (copied)
        py, px = self.rest // wc, self.rest % wc
        base = 2 * py * fw + 2 * px                            # fine row of child q = 0
        quad = torch.tensor([0, 1, fw, fw + 1], device=self.device)
        up_rows = (base[..., None] + quad).flatten(1)          # (B, 4 (M - k)), q = 0..3 per parent
        sy, sx = self.selected // wc, self.selected % wc
        kept_rows = ((2 * sy * fw + 2 * sx)[..., None] + quad).flatten(1)
        order = torch.cat([up_rows, kept_rows], dim=1).int().contiguous()
        return TransitionMap(src.int().contiguous(), group.int().contiguous(), child.contiguous(), 2.0, 5 * m,
                             order, m - k)

    def stage3_positions(self) -> torch.Tensor:
        """``(B, 4M, 2)`` float32 fine-grid positions (what the model uses natively at full resolution)."""
        return grid_positions(*self.fine_hw, device=self.device).expand(self.batch, -1, -1).contiguous()

    def selected_mask(self) -> torch.Tensor:
        """``(B, Hc, Wc)`` bool mask of the coarse tokens upsampled first."""
        return self.is_selected.view(self.batch, *self.coarse_hw)
