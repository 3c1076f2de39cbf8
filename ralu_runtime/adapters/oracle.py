"""An analytic "model" for measuring sampler quality without weights: Gaussian data, exact velocity.

Data. ``C`` latent channels on an ``H x W`` latent grid (patch size 1: one latent pixel = one token, so the
fine token grid is ``H x W`` and RALU's coarse grid is ``H/2 x W/2``). The channels are independent and
identically distributed, each a Gaussian field ``x1 ~ N(m, S)`` over the ``d = H W`` fine tokens:

* ``"stationary"``: power spectrum ``P(k) ∝ (1 + |k|^2 / k0^2)^(-1.5)`` (|k| in cycles per image width,
  ``k0 = max(H, W) / 8`` unless given), evaluated on a 2x zero-padded periodic grid and cropped, so the field
  is stationary but not periodic; unit marginal variance; a fixed smooth mean ``m``.
* ``"nonstationary"``: the same spectrum split into a low-pass part (``|k|`` below half the coarse grid's
  Nyquist frequency, smooth cut) and a high-pass "texture" part; the texture field is multiplied by a fixed
  envelope ``e(i, j)`` (a Gaussian bump off the centre on a floor, mean of ``e^2`` = 1), so the energy of
  mid and high frequencies varies across the image by about 40x between its quietest and busiest regions
  (textured regions are busy at several scales, as in photographs, so the coarse stage can see them).

Tokens. A token is a linear measurement of the fine data: a fine token is one fine latent pixel (an
identity row), a coarse token is the average of its 2x2 fine children. :meth:`GaussianOracle.velocity`
infers each token's level from the :class:`TokenGrid`: ``grid_hw`` equal to the fine grid means every
token is fine (positions in fine units); ``grid_hw`` equal to the coarse grid means positions are in coarse
units, ``fine_mask`` True tokens are fine (children at ``parent + {0, 0.5}``), the others coarse. For a set
of ``L`` tokens with measurement matrix ``A`` (``L x d``), ``y1 = A x1 ~ N(A m, A S A^T)``.

Velocity. The oracle returns the exact minimum-mean-square velocity under the assumption

    y_sigma = (1 - sigma) A x1 + sigma eps,   eps ~ N(0, I_L)  (independent of x1),

i.e. every token, fine or coarse, carries unit-variance independent noise at noise level ``sigma``:

    v = E[eps - y1 | y_sigma] = (y_sigma - E[y1 | y_sigma]) / sigma,
    E[y1 | y] = A m + (1 - sigma) A S A^T ((1 - sigma)^2 A S A^T + sigma^2 I)^(-1) (y - (1 - sigma) A m).

This is the marginal a model trained at that resolution would have learned. It is *not* what RALU's
states are after a transition: the children of an upsampled token then carry the parent's average as
their signal (the within-block detail is missing), and the reference noise variant leaves kept tokens with
too much noise. Those are exactly the approximations of the method; the oracle measures their effect.
The timestep argument is ``1000 sigma`` (diffusers' convention), the prompt is ignored (unconditional).

Decoder. A fixed linear "VAE": a fixed 3 x C channel mix (seeded, normalised), times ``vae_gain``,
upsampled 8x (``vae_mode``: "nearest" by default, or "bilinear"), so the edge-based region selection runs
unchanged on the decoded Tweedie estimate. Canny with thresholds 100/200 on an 8x bilinear upsample of a
smooth field finds almost no edges (the per-pixel gradient is 1/8 of the latent's); nearest upsampling
puts the latent's local contrast onto block boundaries, which Canny sees (see :meth:`edge_fraction`).

Presets: ``family = "flux"``, so ``generate(oracle, "", speedup="7x")`` uses FLUX's presets (base shift 3);
a :class:`~ralu_runtime.schedule.RaluSchedule` may be passed instead. ``baseline_schedule`` gives
SD3/FLUX-like shifted sigmas ``3 s / (1 + 2 s)`` for ``s = linspace(1, 0, N + 1)``.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from ..threads import one_thread
from .base import Conditioning, DiTAdapter, TokenGrid

VARIANTS = ("stationary", "nonstationary")
VAE_MODES = ("nearest", "bilinear")


def spectrum_acf(h: int, w: int, k0: float, exponent: float, weight=None) -> np.ndarray:
    """Autocovariance ``(2h, 2w)`` on the 2x zero-padded periodic grid of a stationary field with power
    ``(1 + |k|^2/k0^2)^-exponent * weight(|k|)`` (|k| in cycles per *fine image* width: ``f * max(h, w)`` with f in
    cycles per token); not normalised."""
    ph, pw = 2 * h, 2 * w
    fy = np.fft.fftfreq(ph)[:, None]
    fx = np.fft.fftfreq(pw)[None, :]
    k = np.sqrt(fy**2 + fx**2) * max(h, w)
    power = (1.0 + (k / k0) ** 2) ** (-exponent)
    if weight is not None:
        power = power * weight(k)
    return np.real(np.fft.ifft2(power))  # autocovariance on the padded torus


def crop_acf(acf: np.ndarray, h: int, w: int, shift=(0, 0)) -> np.ndarray:
    """``(h w, h w)`` cross-covariance ``cov[p, p'] = acf[p - p' - shift]`` of an ``h x w`` crop of the torus field
    with the same crop of it translated by ``shift`` (integer (rows, cols)); not symmetrised."""
    ph, pw = acf.shape
    iy, ix = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    iy, ix = iy.ravel(), ix.ravel()
    dy = (iy[:, None] - iy[None, :] - shift[0]) % ph
    dx = (ix[:, None] - ix[None, :] - shift[1]) % pw
    return acf[dy, dx]


def _spectrum_covariance(h: int, w: int, k0: float, exponent: float, weight=None) -> np.ndarray:
    """Covariance ``(h w, h w)`` of a stationary field with power ``(1 + |k|^2/k0^2)^-exponent * weight(|k|)``.

    Computed on a ``2h x 2w`` periodic grid (|k| in cycles per *fine image* width: ``f * max(h, w)`` with f in
    cycles per token) and cropped to ``h x w``; not normalised.
    """
    cov = crop_acf(spectrum_acf(h, w, k0, exponent, weight), h, w)
    return 0.5 * (cov + cov.T)


def low_pass(h: int, w: int):
    """The non-stationary variant's smooth low-pass weight of |k|: cut at half the coarse grid's Nyquist frequency."""
    k_cut = min(h, w) / 8.0  # half the coarse grid's Nyquist frequency, cycles per image
    return lambda k: 1.0 / (1.0 + (k / k_cut) ** 8)


def envelope(h: int, w: int, offset=(0.0, 0.0)) -> np.ndarray:
    """``(h, w)`` texture envelope of the non-stationary variant (a Gaussian bump off the centre on a floor, mean of
    ``e^2`` = 1), its centre moved by ``offset`` (fractions of the height and width)."""
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    env = 0.18 + np.exp(-((yy - (0.35 + offset[0])) ** 2 + (xx - (0.65 + offset[1])) ** 2) / (2 * 0.18**2))
    return env / np.sqrt(np.mean(env**2))


def mean_pattern(h: int, w: int, amplitude: float, shift=(0, 0)) -> np.ndarray:
    """``(h, w)`` fixed smooth mean pattern, translated by ``shift`` latent pixels."""
    yy, xx = np.meshgrid((np.arange(h) - shift[0]) / h, (np.arange(w) - shift[1]) / w, indexing="ij")
    return amplitude * np.sin(2 * np.pi * (yy + 0.5 * xx) + 0.3) * np.cos(np.pi * xx)


def oracle_size(size, variant: str, vae_mode: str, channels: int) -> tuple[int, int]:
    """``(h, w)`` latent size of an oracle from ``size`` (an int or a pair), after the checks the image and video
    oracles share (even sizes >= 2, a known variant and VAE mode, channels >= 1): ValueError naming the value."""
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise ValueError(f"size must be even and >= 2 in both directions, got {(h, w)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not allowed; choose one of {VARIANTS}")
    if vae_mode not in VAE_MODES:
        raise ValueError(f"vae_mode={vae_mode!r} is not allowed; choose one of {VAE_MODES}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    return h, w


class LayoutCache:
    """A small LRU of per-layout results (token rows, eigen-decompositions), keyed by bytes."""

    def __init__(self, size: int):
        self._items: OrderedDict = OrderedDict()
        self._size = size

    def get(self, key: bytes, build):
        hit = self._items.get(key)
        if hit is None:
            hit = self._items[key] = build()
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return hit


def grid_key(grid: TokenGrid) -> bytes:
    """A digest of everything about ``grid`` that decides its tokens' rows (positions, fine mask, grid, frames)."""
    pos = grid.positions.detach().cpu().contiguous()
    hsh = hashlib.blake2b(pos.numpy().tobytes(), digest_size=16)
    hsh.update(repr((tuple(pos.shape), tuple(grid.grid_hw), bool(grid.raster), int(grid.frames))).encode())
    if grid.fine_mask is not None:
        hsh.update(grid.fine_mask.detach().cpu().contiguous().numpy().tobytes())
    return hsh.digest()


class GaussianOracle(DiTAdapter):
    """Gaussian data with the exact flow velocity for any fine/coarse/mixed token set (see module doc).

    Args:
        size: ``(H, W)`` latent = fine token grid (even numbers), or an int for a square grid.
        channels: independent identically distributed latent channels ``C``.
        variant: "stationary" or "nonstationary".
        k0: spectrum knee in cycles per image width (default ``max(H, W) / 8``).
        mean_amplitude: amplitude of the fixed smooth mean pattern.
        vae_gain, vae_mode: the linear decoder (see module doc).
        dtype: dtype of the tokens it returns (the algebra runs in float64).
    """

    family = "flux"
    default_steps = 50
    default_guidance = 0.0
    base_shift = 3.0
    bounded_work = False  # closed-form velocities: hundreds of samples per call are the point

    def __init__(self, size=16, channels: int = 16, *, variant: str = "stationary", k0: float | None = None,
                 exponent: float = 1.5, mean_amplitude: float = 0.0, vae_gain: float = 0.5,
                 vae_mode: str = "nearest", dtype: torch.dtype = torch.float32, device="cpu", cache_size: int = 8):
        super().__init__(pipe=None)
        h, w = oracle_size(size, variant, vae_mode, channels)
        self.H, self.W, self.C = h, w, int(channels)
        self.variant = variant
        self.k0 = float(k0) if k0 is not None else max(h, w) / 8.0
        self.exponent = float(exponent)
        self.vae_gain = float(vae_gain)
        self.vae_mode = vae_mode
        self._dtype = dtype
        self._device = torch.device(device)
        self._cache = LayoutCache(cache_size)

        self.d = h * w
        if variant == "stationary":
            cov = _spectrum_covariance(h, w, self.k0, self.exponent)
            cov /= np.mean(np.diag(cov))
            self.envelope = None
        else:
            low_w = low_pass(h, w)
            low = _spectrum_covariance(h, w, self.k0, self.exponent, low_w)
            high = _spectrum_covariance(h, w, self.k0, self.exponent, lambda k: 1.0 - low_w(k))
            env = self.envelope = envelope(h, w)
            e = env.ravel()
            cov = low + (e[:, None] * high * e[None, :])
            cov /= np.mean(np.diag(cov))
        self._install_law(cov, mean_pattern(h, w, mean_amplitude))

    def _install_law(self, cov: np.ndarray, mean: np.ndarray) -> None:
        """Make ``N(mean, cov)`` (float64, over the ``d`` fine tokens in raster order) the data law; derive the
        extended token covariance, the sampling square root and the decoder's channel mix."""
        self.cov = torch.from_numpy(cov)                                    # (d, d) float64
        self.mean = torch.from_numpy(mean.ravel().astype(np.float64))       # (d,)
        a_ext = self._extended_measurements()
        self._cov_ext = a_ext @ self.cov @ a_ext.T                          # every fine and coarse token
        self._mean_ext = a_ext @ self.mean
        evals, evecs = torch.linalg.eigh(self.cov)
        self._cov_sqrt = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
        g = torch.Generator().manual_seed(1234)
        mix = torch.randn(3, self.C, generator=g, dtype=torch.float64) + 1.0
        self.vae_mix = (mix / mix.norm(dim=1, keepdim=True)).to(torch.float32)  # unit rows: decoded std ~ gain

    def _extended_measurements(self) -> torch.Tensor:
        """``(d + M, d)``: every token the oracle knows, fine tokens then coarse tokens (coarse raster)."""
        return torch.cat([torch.eye(self.d, dtype=torch.float64), self.block_average_matrix()])

    # ---- geometry --------------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return 1

    @property
    def vae_scale_factor(self) -> int:
        return 8

    @property
    def latent_channels(self) -> int:
        return self.C

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def fine_hw(self) -> tuple[int, int]:
        return (self.H, self.W)

    @property
    def coarse_hw(self) -> tuple[int, int]:
        return (self.H // 2, self.W // 2)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels to pass to :func:`ralu_runtime.generate`."""
        return (8 * self.H, 8 * self.W)

    # ---- data ------------------------------------------------------------------------------------------
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` latents ``(n, C, H, W)`` float64 drawn from the data distribution."""
        z = torch.randn(n, self.C, self.d, generator=generator, dtype=torch.float64)
        x = self.mean + z @ self._cov_sqrt.T
        return x.view(n, self.C, self.H, self.W)

    def block_average_matrix(self) -> torch.Tensor:
        """``(M, d)`` float64: row ``i`` averages the 2x2 fine children of coarse token ``i`` (coarse raster)."""
        hc, wc = self.coarse_hw
        idx, wts = self._coarse_children(torch.arange(hc, dtype=torch.float64).repeat_interleave(wc),
                                         torch.arange(wc, dtype=torch.float64).repeat(hc))
        a = torch.zeros(hc * wc, self.d, dtype=torch.float64)
        a.scatter_add_(1, idx, wts)
        return a

    def _coarse_children(self, ci: torch.Tensor, cj: torch.Tensor):
        """Fine indices ``(n, 4)`` and weights 1/4 of coarse tokens at integer coarse positions."""
        fi = 2 * ci.long()[:, None] + torch.tensor([0, 0, 1, 1])
        fj = 2 * cj.long()[:, None] + torch.tensor([0, 1, 0, 1])
        return fi * self.W + fj, torch.full(fi.shape, 0.25, dtype=torch.float64)

    # ---- token sets ------------------------------------------------------------------------------------
    def token_rows(self, positions: torch.Tensor, grid_hw, fine_mask: torch.Tensor | None):
        """Sparse measurement rows of one image's tokens: fine indices ``(L, 4)`` int64, weights ``(L, 4)``.

        A fine token has its fine index in column 0 with weight 1 (other weights 0); a coarse token averages
        its 4 children with weights 1/4. Raises ValueError for positions that are not on the grid.
        """
        grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        pos = positions.detach().to("cpu", torch.float64)
        l = pos.shape[0]
        if grid_hw == self.fine_hw:
            if fine_mask is not None and bool(fine_mask.any()):
                raise ValueError("tokens finer than the oracle's fine grid were requested")
            fine = torch.ones(l, dtype=torch.bool)
            fpos = pos
        elif grid_hw == self.coarse_hw:
            fine = torch.zeros(l, dtype=torch.bool) if fine_mask is None else fine_mask.detach().to("cpu", torch.bool)
            fpos = 2.0 * pos
        else:
            raise ValueError(f"grid_hw={grid_hw} is neither the oracle's fine grid {self.fine_hw} nor its coarse "
                             f"grid {self.coarse_hw}")
        idx = torch.zeros(l, 4, dtype=torch.int64)
        wts = torch.zeros(l, 4, dtype=torch.float64)
        fr, fc = fpos[:, 0], fpos[:, 1]
        if fine.any():
            r, c = fr[fine], fc[fine]
            if not (torch.equal(r, r.round()) and torch.equal(c, c.round())):
                raise ValueError("fine tokens must sit on fine-grid cells (coarse position + {0, 0.5})")
            if r.min() < 0 or c.min() < 0 or r.max() >= self.H or c.max() >= self.W:
                raise ValueError("fine token position outside the grid")
            idx[fine, 0] = (r.long() * self.W + c.long())
            wts[fine, 0] = 1.0
        coarse = ~fine
        if coarse.any():
            ci, cj = pos[coarse, 0], pos[coarse, 1]
            if not (torch.equal(ci, ci.round()) and torch.equal(cj, cj.round())):
                raise ValueError("coarse tokens must sit on integer coarse positions")
            hc, wc = self.coarse_hw
            if ci.min() < 0 or cj.min() < 0 or ci.max() >= hc or cj.max() >= wc:
                raise ValueError("coarse token position outside the grid")
            idx[coarse], wts[coarse] = self._coarse_children(ci, cj)
        return idx, wts

    def measurement_matrix(self, positions: torch.Tensor, grid_hw, fine_mask=None) -> torch.Tensor:
        """Dense ``A (L, d)`` float64 of one image's tokens (see :meth:`token_rows`)."""
        idx, wts = self.token_rows(positions, grid_hw, fine_mask)
        a = torch.zeros(idx.shape[0], self.d, dtype=torch.float64)
        a.scatter_add_(1, idx, wts)
        return a

    def _ext_index(self, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        """Row of each token in the extended measurement set [fine tokens (d); coarse tokens (M)]."""
        coarse = wts[:, 1] != 0
        first = idx[:, 0]
        parent = (first // self.W // 2) * (self.W // 2) + (first % self.W) // 2
        return torch.where(coarse, self.d + parent, first)

    def _shared_eig(self, e: torch.Tensor):
        """``(U, lam, mu)`` with ``A S A^T = U diag(lam) U^T`` for one layout (extended rows ``e``), cached."""
        def build():
            lam, u = torch.linalg.eigh(self._cov_ext[e[:, None], e[None, :]])
            return u, lam.clamp_min(0.0), self._mean_ext[e]

        return self._cache.get(b"eig" + e.numpy().tobytes(), build)

    def _token_ext(self, positions: torch.Tensor, grid: TokenGrid, fine_mask) -> torch.Tensor:
        """``(L,)`` extended rows of one image's tokens (``positions (L, 2)``, ``fine_mask (L,)`` or None)."""
        return self._ext_index(*self.token_rows(positions, grid.grid_hw, fine_mask))

    def _batch_ext(self, grid: TokenGrid) -> torch.Tensor:
        """``(B, L)`` rows of every image's tokens in the extended set (one row for raster grids: one layout for the
        whole batch), cached for the last few grids."""
        def build():
            pos = grid.positions.detach().cpu()
            nb = 1 if grid.raster else pos.shape[0]
            return torch.stack([self._token_ext(pos[b], grid, None if grid.fine_mask is None else grid.fine_mask[b])
                                for b in range(nb)])

        return self._cache.get(grid_key(grid), build)

    # ---- model -----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, num_images_per_prompt=1,
                      guidance_scale=0.0, max_sequence_length=None):
        """Unconditional: only the batch size ``len(prompts) * num_images_per_prompt`` is used."""
        if prompt is not None:
            n = 1 if isinstance(prompt, str) else len(prompt)
        elif prompt_embeds is not None:
            n = int(prompt_embeds.shape[0])
        else:
            n = 1
        return Conditioning(n * num_images_per_prompt, {})

    def prepare_noise(self, batch, height, width, generators, dtype):
        if self.latent_hw(height, width) != self.fine_hw:
            raise ValueError(f"the oracle's images are {self.image_size[0]}x{self.image_size[1]} pixels "
                             f"(latent {self.fine_hw}); got height={height}, width={width}")
        return super().prepare_noise(batch, height, width, generators, dtype)

    def velocity(self, tokens, grid, timestep, cond=None, impl=None):
        with one_thread():
            return self._velocity(tokens, grid, timestep)

    def _velocity(self, tokens, grid, timestep):
        """Exact ``v = (y - E[y1 | y]) / sigma`` for every image's token set; ``sigma = timestep / 1000``."""
        sigma = float(timestep) / 1000.0
        if not 0.0 < sigma <= 1.0:
            raise ValueError(f"sigma={sigma} outside (0, 1]")
        y = tokens.detach().to("cpu", torch.float64)                                         # (B, L, C)
        ext = self._batch_ext(grid)                                                       # (B or 1, L)
        # v = (y - E[y1|y]) / sigma = (sigma I - (1 - sigma) Sa) M^-1 z - mu,  z = y - (1 - sigma) mu,
        # M = (1 - sigma)^2 Sa + sigma^2 I  (Sa = A S A^T and M commute)
        s1 = 1.0 - sigma
        if ext.shape[0] == 1:  # shared layout: cached eigendecomposition, two (L, L) @ (L, B C) products
            u, lam, mu = self._shared_eig(ext[0])
            gain = (sigma - s1 * lam) / (s1 * s1 * lam + sigma * sigma)
            b, l, c = y.shape
            z = (y - s1 * mu[:, None]).transpose(0, 1).reshape(l, b * c)
            v = u @ (gain[:, None] * (u.T @ z)) - mu[:, None]
            return v.view(l, b, c).transpose(0, 1).to(tokens.device, tokens.dtype)
        out = torch.empty_like(y)
        for start in range(0, y.shape[0], 256):
            e = ext[start:start + 256]
            sa = self._cov_ext[e[:, :, None], e[:, None, :]]                               # (n, L, L)
            mu = self._mean_ext[e][..., None]                                              # (n, L, 1)
            eye = torch.eye(e.shape[1], dtype=torch.float64)
            # batched LU solve: much faster on CPU than batched triangular solves or eigh
            w = torch.linalg.solve(s1 * s1 * sa + sigma * sigma * eye, y[start:start + 256] - s1 * mu)
            out[start:start + 256] = sigma * w - s1 * (sa @ w) - mu
        return out.to(tokens.device, tokens.dtype)

    def baseline_schedule(self, num_steps, image_seq_len=None):
        s = np.linspace(1.0, 0.0, num_steps + 1)
        h = self.base_shift
        sig = h * s / (1.0 + (h - 1.0) * s)
        sigmas = torch.tensor(sig, dtype=torch.float32, device=self.device)
        return (sigmas[:-1] * 1000.0).contiguous(), sigmas

    def decode(self, latents, impl=None):
        x = torch.einsum("rc,bchw->brhw", self.vae_mix.to(latents.device), latents.to(torch.float32))
        kw = {"align_corners": False} if self.vae_mode == "bilinear" else {}
        return F.interpolate(self.vae_gain * x, scale_factor=8, mode=self.vae_mode, **kw)

    def postprocess(self, images, output_type):
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=8).postprocess(images, output_type=output_type)

    # ---- diagnostics -----------------------------------------------------------------------------------
    def edge_fraction(self, n: int = 64, seed: int = 0) -> float:
        """Fraction of pixels Canny (100/200) marks on decoded data latents at half resolution."""
        from ..edges import edge_scores

        x = self.sample_data(n, torch.Generator().manual_seed(seed)).to(torch.float32)
        half = x.view(n, self.C, self.H // 2, 2, self.W // 2, 2).mean((3, 5))
        scores = edge_scores(self.decode(half), 8)
        return float(scores.sum()) / (n * 64 * self.H * self.W / 4)
