"""The Gaussian oracle for video: Gaussian clips with the exact flow velocity (see :mod:`.oracle` for images).

Data. ``C`` i.i.d. latent channels of ``F`` latent frames of an ``h x w`` fine latent grid (patch size 1,
``temporal_factor`` 1: ``num_frames`` is the number of latent frames). Each channel is a Gaussian field
``x1 ~ N(m, S)`` over the ``d = F h w`` fine tokens, with the space-time covariance

    S[(t, p), (t', p')] = rho^|t - t'| * (L(p - p' - (s_t - s_t')) + e_t(p) H(p - p' - (s_t - s_t')) e_t'(p')),

``L`` / ``H`` the image oracle's stationary autocovariances (``"stationary"``: the whole spectrum in ``L``, no
``H``; ``"nonstationary"``: the low-pass part in ``L``, the high-pass "texture" in ``H``), ``rho`` the temporal
AR(1) correlation, ``s_t = round(motion * t)`` the integer translation of the content at frame ``t`` and ``e_t``
the image oracle's texture envelope with its centre moved by ``motion * t`` latent pixels (exactly, not rounded):
slow motion of the busy region, so choosing regions per frame and choosing one set for the whole clip differ.
``S`` is normalised to unit mean marginal variance; the mean is the image oracle's pattern moved with the content.
With ``F = 1`` (any ``rho``, ``motion``) the law is bit for bit that of :class:`~.oracle.GaussianOracle`.

Tokens. The sampler runs a video as a tall image (:class:`~ralu_runtime.adapters.base.TokenGrid`): the fine grid
is ``(F h, w)`` and the coarse grid ``(F h/2, w/2)``, a token at row ``r`` is in frame ``r // R`` (``R`` rows per
frame) at row ``r - frame R``. A fine token is one fine latent pixel of its frame, a coarse token the 2x2 average
within its frame (time is never averaged). One more level exists for composed samplers that also halve time in
their first stage: a grid with ``frames = F / 2`` and ``grid_hw = (F/2 h/2, w/2)`` holds space-time coarse tokens,
each the average of the 2x2 blocks of frames ``2 tau`` and ``2 tau + 1`` (8 fine pixels). The velocity is exactly
the image oracle's: every token carries unit-variance independent noise at its noise level and
``v = (y - E[y1 | y]) / sigma`` with ``y1 = A x1 ~ N(A m, A S A^T)`` (see :mod:`.oracle`).

Decoder. The image oracle's linear "VAE" applied frame by frame: latents ``(B, C, F, h, w)`` -> video
``(B, 3, F, 8h, 8w)``; :meth:`edge_images` stacks the decoded frames vertically for the sampler's region choice.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .base import DiTAdapter, TokenGrid
from ..threads import one_thread
from .oracle import GaussianOracle, LayoutCache, crop_acf, envelope, low_pass, mean_pattern, oracle_size, spectrum_acf


def _content_shift(motion, t: int) -> tuple[int, int]:
    """Integer translation ``round(motion * t)`` (halves round up) of the content at frame ``t``."""
    return (int(math.floor(motion[0] * t + 0.5)), int(math.floor(motion[1] * t + 0.5)))


def video_covariance(h: int, w: int, frames: int, *, variant: str = "stationary", k0: float | None = None,
                     exponent: float = 1.5, rho: float = 0.9, motion=(0.0, 0.0)):
    """``(cov (F h w, F h w), envelopes (F, h, w) or None)`` of the law in the module doc, float64, unit mean
    marginal variance. Frame-diagonal blocks are built with the image oracle's own operations (so ``F = 1`` gives
    its covariance exactly); block ``(t', t)`` is the transpose of block ``(t, t')``."""
    k0 = float(k0) if k0 is not None else max(h, w) / 8.0
    if variant == "stationary":
        parts = [spectrum_acf(h, w, k0, exponent)]
        envs = None
    else:
        low_w = low_pass(h, w)
        parts = [spectrum_acf(h, w, k0, exponent, low_w), spectrum_acf(h, w, k0, exponent, lambda k: 1.0 - low_w(k))]
        envs = np.stack([envelope(h, w, (motion[0] * t / h, motion[1] * t / w)) for t in range(frames)])
    n = h * w
    cov = np.empty((frames * n, frames * n))
    shifts = [_content_shift(motion, t) for t in range(frames)]
    for t in range(frames):
        for u in range(t, frames):
            rel = (shifts[t][0] - shifts[u][0], shifts[t][1] - shifts[u][1])
            blocks = [crop_acf(acf, h, w, rel) for acf in parts]
            if t == u:
                blocks = [0.5 * (b + b.T) for b in blocks]
            blk = blocks[0]
            if envs is not None:
                et, eu = envs[t].ravel(), envs[u].ravel()
                blk = blk + (et[:, None] * blocks[1] * eu[None, :])
            blk = blk * rho ** (u - t)
            cov[t * n:(t + 1) * n, u * n:(u + 1) * n] = blk
            if u != t:
                cov[u * n:(u + 1) * n, t * n:(t + 1) * n] = blk.T
    cov /= np.mean(np.diag(cov))
    return cov, envs


class GaussianVideoOracle(GaussianOracle):
    """Gaussian video clips with the exact flow velocity for any fine / coarse / mixed token set (module doc).

    Args:
        size: ``(h, w)`` fine latent grid of one frame (even numbers), or an int for a square grid.
        frames: latent frames ``F`` (= ``num_frames``; ``temporal_factor`` is 1).
        channels: independent identically distributed latent channels ``C``.
        variant: "stationary" or "nonstationary" (the image oracle's spectra).
        rho: temporal AR(1) correlation between neighbouring frames, in (-1, 1).
        motion: ``(rows, cols)`` latent pixels per frame: the content moves by ``round(motion t)``, the texture
            envelope's centre by ``motion t``.
        k0, exponent, mean_amplitude, vae_gain, vae_mode, dtype, device, cache_size: as for the image oracle.

    Attributes: ``F``, ``h``, ``w`` (per frame); ``H = F h``, ``W = w`` (the tall fine grid, which the inherited
    token machinery indexes); ``envelopes`` ``(F, h, w)`` (nonstationary) or None.
    """

    is_video = True
    temporal_factor = 1

    def __init__(self, size=8, frames: int = 4, channels: int = 16, *, variant: str = "stationary", rho: float = 0.9,
                 motion=(0.0, 0.0), k0: float | None = None, exponent: float = 1.5, mean_amplitude: float = 0.0,
                 vae_gain: float = 0.5, vae_mode: str = "nearest", dtype: torch.dtype = torch.float32, device="cpu",
                 cache_size: int = 8):
        DiTAdapter.__init__(self, pipe=None)
        h, w = oracle_size(size, variant, vae_mode, channels)
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
            raise ValueError(f"frames must be an integer >= 1, got {frames!r}")
        if not -1.0 < float(rho) < 1.0:
            raise ValueError(f"rho={rho!r} is not allowed: need -1 < rho < 1")
        motion = (float(motion[0]), float(motion[1]))
        self.F, self.h, self.w = int(frames), h, w
        self.H, self.W, self.C = self.F * h, w, int(channels)
        self.d = self.F * h * w
        self.variant, self.rho, self.motion = variant, float(rho), motion
        self.k0 = float(k0) if k0 is not None else max(h, w) / 8.0
        self.exponent = float(exponent)
        self.vae_gain, self.vae_mode = float(vae_gain), vae_mode
        self._dtype, self._device = dtype, torch.device(device)
        self._cache = LayoutCache(cache_size)
        self.default_frames = self.F
        self.default_size = 8 * h  # generate's default height and width (pass width= for non-square frames)
        with one_thread():
            self._build(mean_amplitude)

    def _build(self, mean_amplitude: float) -> None:
        h, w, motion = self.h, self.w, self.motion
        cov, self.envelopes = video_covariance(h, w, self.F, variant=self.variant, k0=self.k0, exponent=self.exponent,
                                               rho=self.rho, motion=motion)
        self.envelope = None if self.envelopes is None else self.envelopes.reshape(self.F * h, w)  # tall
        mean = np.concatenate([mean_pattern(h, w, mean_amplitude, _content_shift(motion, t)).ravel()
                               for t in range(self.F)])
        self._install_law(cov, mean)

    # ---- geometry --------------------------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels of one frame, to pass to :func:`ralu_runtime.generate`."""
        return (8 * self.h, 8 * self.w)

    @property
    def time_coarse_hw(self) -> tuple[int, int]:
        """Tall grid of the space-time coarse level (``F / 2`` frames of ``h/2 x w/2``); F must be even."""
        return ((self.F // 2) * (self.h // 2), self.w // 2)

    def _extended_measurements(self) -> torch.Tensor:
        """``(d + M + M / 2, d)``: fine tokens, coarse tokens (tall coarse raster), and, for even ``F``, space-time
        coarse tokens (the mean of the coarse tokens at the same place in frames ``2 tau`` and ``2 tau + 1``)."""
        a = self.block_average_matrix()
        rows = [torch.eye(self.d, dtype=torch.float64), a]
        if self.F % 2 == 0:
            per = (self.h // 2) * (self.w // 2)
            pairs = a.view(self.F // 2, 2, per, self.d)
            rows.append(0.5 * (pairs[:, 0] + pairs[:, 1]).reshape(-1, self.d))
        return torch.cat(rows)

    # ---- data ------------------------------------------------------------------------------------------
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` clips ``(n, C, F, h, w)`` float64 drawn from the data distribution."""
        z = torch.randn(n, self.C, self.d, generator=generator, dtype=torch.float64)
        x = self.mean + z @ self._cov_sqrt.T
        return x.view(n, self.C, self.F, self.h, self.w)

    @staticmethod
    def tall(latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, h, w)`` -> ``(B, C, F h, w)`` (the tall image the metrics of :mod:`ralu_runtime.oracle_metrics`
        take: its raster order is the oracle's fine-token order)."""
        b, c, f, h, w = latents.shape
        return latents.reshape(b, c, f * h, w)

    # ---- token sets ------------------------------------------------------------------------------------
    def token_ext(self, positions: torch.Tensor, grid_hw, fine_mask: torch.Tensor | None = None,
                  frames: int | None = None) -> torch.Tensor:
        """Row ``(L,)`` int64 of each of one clip's tokens in the extended set [fine (d); coarse (M); space-time
        coarse (M/2)]: the level from ``(frames, grid_hw)``, each token's frame from its tall-grid row.

        Raises ValueError for grids the oracle does not have and positions off the grid.
        """
        frames = self.F if frames is None else int(frames)
        grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        pos = positions.detach().to("cpu", torch.float64)
        n = pos.shape[0]
        fine = torch.zeros(n, dtype=torch.bool) if fine_mask is None else fine_mask.detach().to("cpu", torch.bool)
        hc, wc = self.h // 2, self.w // 2
        if frames == self.F and grid_hw == self.fine_hw:
            level, rows, cols = "fine", self.h, self.w
        elif frames == self.F and grid_hw == self.coarse_hw:
            level, rows, cols = "coarse", hc, wc
        elif self.F % 2 == 0 and frames == self.F // 2 and grid_hw == self.time_coarse_hw:
            level, rows, cols = "time", hc, wc
        else:
            raise ValueError(f"a grid of {frames} frames on grid_hw={grid_hw} is none of the oracle's: fine "
                             f"{self.fine_hw} / coarse {self.coarse_hw} with {self.F} frames" +
                             (f", or space-time coarse {self.time_coarse_hw} with {self.F // 2}" if self.F % 2 == 0
                              else ""))
        if level != "coarse" and bool(fine.any()):
            raise ValueError("tokens finer than the grid's level are only allowed on the coarse grid (stage 2)")
        r, c = pos[:, 0], pos[:, 1]
        frame = torch.floor(r / rows)
        rin = r - frame * rows
        if bool((frame < 0).any()) or bool((frame >= frames).any()) or bool((c < 0).any()) or bool((c >= cols).any()):
            raise ValueError("token position outside the grid")
        frame = frame.long()
        ext = torch.empty(n, dtype=torch.int64)
        if fine.any():  # stage-2 children: coarse position + {0, 0.5}, fine pixel (2 row, 2 col) of their frame
            fr, fc = 2.0 * rin[fine], 2.0 * c[fine]
            if not (torch.equal(fr, fr.round()) and torch.equal(fc, fc.round())):
                raise ValueError("fine tokens must sit on fine-grid cells (coarse position + {0, 0.5})")
            ext[fine] = (frame[fine] * self.h + fr.long()) * self.w + fc.long()
        rest = ~fine
        if rest.any():
            ri, ci = rin[rest], c[rest]
            if not (torch.equal(ri, ri.round()) and torch.equal(ci, ci.round())):
                raise ValueError(f"{level} tokens must sit on integer positions of their grid")
            idx = (frame[rest] * rows + ri.long()) * cols + ci.long()
            base = {"fine": 0, "coarse": self.d, "time": self.d + self.F * hc * wc}[level]
            ext[rest] = base + idx
        return ext

    def measurement_matrix(self, positions: torch.Tensor, grid_hw, fine_mask=None, frames: int | None = None
                           ) -> torch.Tensor:
        """Dense ``A (L, d)`` float64 of one clip's tokens (see :meth:`token_ext`)."""
        return self._extended_measurements()[self.token_ext(positions, grid_hw, fine_mask, frames)]

    def _token_ext(self, positions: torch.Tensor, grid: TokenGrid, fine_mask) -> torch.Tensor:
        """``(L,)`` extended rows of one clip's tokens (see :meth:`token_ext`)."""
        return self.token_ext(positions, grid.grid_hw, fine_mask, grid.frames)

    # ---- latents -----------------------------------------------------------------------------------------
    def prepare_noise(self, batch, height, width, generators, dtype, num_frames=None):
        """``(B, C, F, h, w)`` standard normal noise (diffusers' ``randn_tensor`` from the generators)."""
        from diffusers.utils.torch_utils import randn_tensor

        num_frames = self.F if num_frames is None else num_frames
        if self.latent_hw(height, width) != (self.h, self.w) or num_frames != self.F:
            raise ValueError(f"the oracle's clips are {self.F} frames of {self.image_size[0]}x{self.image_size[1]} "
                             f"pixels (latent {self.h}x{self.w}); got num_frames={num_frames}, height={height}, "
                             f"width={width}")
        return randn_tensor((batch, self.C, self.F, self.h, self.w), generator=generators, device=self.device,
                            dtype=dtype)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, h, w)`` (or the tall ``(B, C, F h, w)``) -> ``(B, F h w, C)`` tokens, tall raster order."""
        if latents.ndim == 5:
            latents = self.tall(latents)
        return super().pack(latents)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of :meth:`pack`: ``(B, f h w, C)`` -> ``(B, C, f, h, w)``; ``f`` from the token count."""
        f = tokens.shape[1] // (h * w)
        tall = super().unpack(tokens, f * h, w)
        return tall.view(tall.shape[0], tall.shape[1], f, h, w)

    def decode(self, latents, impl=None):
        """``(B, C, F, h, w)`` -> video ``(B, 3, F, 8h, 8w)``, frame by frame (4-D latents: one image)."""
        if latents.ndim == 4:
            return super().decode(latents, impl)
        b, c, f, h, w = latents.shape
        x = torch.einsum("rc,bcfhw->bfrhw", self.vae_mix.to(latents.device), latents.to(torch.float32))
        kw = {"align_corners": False} if self.vae_mode == "bilinear" else {}
        img = F.interpolate(self.vae_gain * x.reshape(b * f, 3, h, w), scale_factor=8, mode=self.vae_mode, **kw)
        return img.view(b, f, 3, 8 * h, 8 * w).transpose(1, 2)

    def edge_images(self, latents, decode):
        """One decoded frame per latent frame, stacked vertically: ``(B, 3, F 8h, 8w)``."""
        video = decode(latents)
        b, ch, f, hh, ww = video.shape
        return video.reshape(b, ch, f * hh, ww)

    def postprocess(self, images, output_type):
        """Video ``(B, 3, F, H, W)`` in [-1, 1] -> per clip ``F`` frames: "pt" ``(B, F, 3, H, W)``, "np"
        ``(B, F, H, W, 3)`` in [0, 1], "pil" a list of lists of PIL images (as diffusers' video pipelines)."""
        if images.ndim == 4:
            return super().postprocess(images, output_type)
        b, c, f, hh, ww = images.shape
        frames = super().postprocess(images.transpose(1, 2).reshape(b * f, c, hh, ww), output_type)
        if output_type == "pil":
            return [frames[i * f:(i + 1) * f] for i in range(b)]
        return frames.reshape(b, f, *frames.shape[1:])
