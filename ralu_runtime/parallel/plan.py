"""Resolving ``generate(parallel=...)`` into a :class:`SequenceParallel` plan, and the plan's collectives.

Consistency across ranks ("all compute identically", checked): every rank runs the whole ``generate`` call with the
same arguments. Everything outside the model calls -- initial noise, stage-1 -> 2 region choice, transitions (Philox
noise from seeds drawn from the same generators), solver steps, VAE decode -- is computed by every rank from the same
inputs. The model call's output is all-gathered, so every rank gets the same bytes; the solver's elementwise update
of identical bytes is identical. Two places where identical inputs are not enough are closed explicitly:

* ``seed=None`` and no generator: rank 0 draws the seed and broadcasts it (otherwise each rank's global RNG would
  pick its own noise);
* VAE decodes (the edge preview that decides the regions, and the final image): every rank decodes and rank 0's
  result is broadcast, so an autotuned convolution (``cudnn.benchmark``) that differs between processes cannot make
  the ranks choose different regions.

And it is verified: before any other collective, the ranks compare the degrees and the call's settings (seed,
generator states, sizes, schedule, guidance scale, feature cache, sampler options; :meth:`SequenceParallel.agree`),
so ranks that would run different collectives or combine different results are refused by name; and at the first
model call of every stage, each rank fingerprints the call's inputs (tokens, token positions, timestep, text
conditioning; the bits, not a float sum) and the fingerprints are compared across ranks. A difference
raises :class:`RanksDivergedError` on every rank at once (no hang, no silent mix of two images).
"""
from __future__ import annotations

import hashlib
import threading
import weakref

import torch
import torch.distributed as dist

from ..execution.sharding import all_gather_flat, gather_rows, spec


_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (its model_state, digest)


def weights_digest(models) -> str:
    """A digest of the values of every parameter and buffer of ``models`` (sha256 over each tensor's integer sum
    of its bits): what the ranks of a context-parallel call compare, so that a rank holding other weights (a LoRA
    loaded on one rank, another checkpoint) is refused instead of mixing its results with the others'. Recomputed
    only when a model's tensors are replaced or modified in place (:func:`~ralu_runtime.compile.runner.model_state`
    identity and versions: ~1.4 ms for FLUX.1-dev), else cached: a write through ``.data`` after the first
    parallel call (no version counter moves) is not seen here. Meta tensors and tensor subclasses without a bit
    view count by shape and dtype only."""
    from ..compile.runner import bits_sum, model_fingerprint

    out = []
    for model in models:
        state = model_fingerprint(model, versions=True)
        hit = _DIGESTS.get(model)
        if hit is None or hit[0] != state:
            h = hashlib.sha256()
            sums: dict = {}
            for t in list(model.parameters()) + list(model.buffers()):
                h.update(f"{tuple(t.shape)}{t.dtype}".encode())
                try:
                    if not t.is_meta:
                        sums.setdefault(t.device, []).append(bits_sum(t))
                except (RuntimeError, TypeError, NotImplementedError):  # a subclass without a plain bit view
                    pass
            for device in sorted(sums, key=str):   # one transfer per device
                h.update(torch.stack(sums[device]).cpu().numpy().tobytes())
            hit = _DIGESTS[model] = (state, h.hexdigest())
        out.append(hit[1])
    return ",".join(out)


class RanksDivergedError(RuntimeError):
    """The ranks of a context-parallel ``generate`` call hold different inputs for the same model call."""


_GROUPS: dict = {}
_GROUPS_LOCK = threading.Lock()


def _world_groups(ring: int, ulysses: int):
    """``(flat, ring_group, ulysses_group)`` over the default group: ranks ``r * ulysses + u``; ulysses groups
    ``{r*U + u : u}``, ring groups ``{r*U + u : r}`` (every rank creates every group, in one order; cached)."""
    world = dist.group.WORLD
    key = (ring, ulysses)
    with _GROUPS_LOCK:
        cached = _GROUPS.get(key)
        if cached is not None and cached[0] is world:
            return cached[1]
        rank = dist.get_rank()
        ug = rg = world
        if ring > 1 and ulysses > 1:
            for r in range(ring):
                g = dist.new_group([r * ulysses + u for u in range(ulysses)])
                if rank // ulysses == r:
                    ug = g
            for u in range(ulysses):
                g = dist.new_group([r * ulysses + u for r in range(ring)])
                if rank % ulysses == u:
                    rg = g
        groups = (world, rg, ug)
        _GROUPS[key] = (world, groups)
        return groups


def _mesh_groups(mesh):
    """``(flat, ring_group, ulysses_group)`` of a device mesh with dimensions "ring" and "ulysses"."""
    flat = mesh["ring", "ulysses"]._flatten()
    return flat.get_group(), mesh["ring"].get_group(), mesh["ulysses"].get_group()


def _digest(value) -> int:
    """A signed 64-bit hash of ``repr(value)`` (the same in every process)."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little", signed=True)


class SequenceParallel:
    """One ``generate`` call's context parallelism: ``ulysses`` x ``ring`` ranks, each holding a contiguous shard of
    every model call's joint sequence (:mod:`ralu_runtime.execution.sharding`).

    Built by :func:`resolve_parallel` (checks only); :meth:`setup` resolves the process groups (collective: every
    rank calls it, as ``generate`` does). ``source``: "argument" (``generate(parallel=config)``) or "model" (the
    transformer's own ``enable_parallelism`` config, adopted).
    """

    def __init__(self, config, *, ulysses: int, ring: int, device: torch.device, source: str = "argument"):
        self.config = config
        self.ulysses, self.ring = int(ulysses), int(ring)
        self.world = self.ulysses * self.ring
        self.device = torch.device(device)
        self.source = source
        self.flat = self.ring_group = self.ulysses_group = None
        self.index = 0
        self._last_grid = None

    def __repr__(self) -> str:
        return f"SequenceParallel(ulysses={self.ulysses}, ring={self.ring}, source={self.source!r})"

    # ---- groups
    def setup(self, settings: dict | None = None) -> "SequenceParallel":
        """Resolve the process groups, after comparing the degrees and ``settings`` (:meth:`agree`) across ranks."""
        cfg = self.config
        groups = None
        if getattr(cfg, "_flattened_mesh", None) is not None:  # set up by diffusers (enable_parallelism)
            groups = (cfg._flattened_mesh.get_group(), cfg._ring_mesh.get_group(), cfg._ulysses_mesh.get_group())
        elif getattr(cfg, "mesh", None) is not None:
            groups = _mesh_groups(cfg.mesh)
        # before the first collective that depends on them (ralu's own groups, the shared seed, the model calls)
        self.agree(dist.group.WORLD if groups is None else groups[0], settings)
        if groups is None:
            groups = _world_groups(self.ring, self.ulysses)
        self.flat, self.ring_group, self.ulysses_group = groups
        self.index = dist.get_rank(self.flat)
        ur = dist.get_rank(self.ulysses_group) if self.ulysses > 1 else 0
        rr = dist.get_rank(self.ring_group) if self.ring > 1 else 0
        if rr * self.ulysses + ur != self.index:
            raise ValueError(f"the process groups do not have the ('ring', 'ulysses') layout: rank {self.index} of "
                             f"the flattened group is ring rank {rr}, ulysses rank {ur}")
        return self

    def attention_spec(self):
        """The interned :class:`~ralu_runtime.execution.sharding.AttentionSpec` of this plan's groups (the attention
        backend is added per call from the processor's choice: ``AttentionSpec.with_backend``)."""
        return spec(self.ulysses_group.group_name if self.ulysses > 1 else "",
                    self.ring_group.group_name if self.ring > 1 else "", self.ulysses, self.ring, "")

    def agree(self, group, settings: dict | None = None) -> None:
        """Compare the degrees and the call's ``settings`` (name -> value, compared by ``repr``) across the ranks
        of ``group``; :class:`RanksDivergedError` on every rank naming what differs. Ranks that disagree on these
        would run different collectives (a hang) or combine different results (a silent mix)."""
        items = [("ulysses_degree", self.ulysses), ("ring_degree", self.ring)] + list((settings or {}).items())
        codes = torch.tensor([_digest(v) for _, v in items], dtype=torch.int64, device=self.device)
        n = len(items)
        sizes = all_gather_flat(torch.tensor([n], device=self.device), group).view(-1).tolist()
        if len(set(sizes)) > 1:
            raise RanksDivergedError(f"the ranks compare different numbers of settings ({sizes}): every rank must "
                                     "run the same version of ralu")
        codes = all_gather_flat(codes, group)
        bad = [i for i in range(n) if not bool((codes[:, i] == codes[0, i]).all())]
        if bad:
            ranks = [r for r in range(codes.shape[0]) if not torch.equal(codes[r], codes[0])]
            mine = ", ".join(f"{items[i][0]}={items[i][1]!r}" for i in bad)
            weights = any(items[i][0] == "weights" for i in bad)
            raise RanksDivergedError(f"ranks {ranks} call generate with other arguments than rank 0: "
                                     f"{', '.join(items[i][0] for i in bad)} (this rank: {mine}); every rank must "
                                     "call generate with the same arguments"
                                     + (" on the same model (its weights differ between the ranks: load the same "
                                        "checkpoint and LoRAs, with the same scales, on every rank)" if weights else ""))

    # ---- collectives
    def gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """This rank's rows ``x (B, sizes[index], ...)`` -> all rows ``(B, sum(sizes), ...)`` on every rank."""
        return gather_rows(x, sizes, self.flat)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank (in place on the others; same shape and dtype everywhere)."""
        x = x.contiguous()
        dist.broadcast(x, src=dist.get_global_rank(self.flat, 0), group=self.flat)
        return x

    def shared_seed(self) -> int:
        """A seed drawn by rank 0 from its global RNG, the same on every rank."""
        s = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(self.device)
        return int(self.broadcast(s).item())

    @staticmethod
    def call_module(module, x):
        """``module(x)``, without a diffusers context-parallel gather hook that ``enable_parallelism`` may have put on
        it (ralu gathers itself; such a hook would gather a second time)."""
        registry = getattr(module, "_diffusers_hook", None)
        hooks = getattr(registry, "hooks", None) or {}
        if any(str(name).startswith("cp_output---") for name in hooks):
            return type(module).forward(module, x)
        return module(x)

    # ---- consistency
    @staticmethod
    def _bits(t: torch.Tensor) -> torch.Tensor:
        """Two int64 numbers from the bits of ``t``: plain and position-weighted sum (integer arithmetic, wraps)."""
        t = t.detach().contiguous()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        if t.is_floating_point() or t.is_complex():
            width = t.element_size()
            t = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width])
        flat = t.reshape(-1).to(torch.int64)
        w = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1
        return torch.stack([flat.sum(), (flat * w).sum(), torch.tensor(flat.numel(), device=flat.device)])

    def fingerprint(self, tokens, grid, timestep, cond) -> torch.Tensor:
        parts = [tokens, grid.positions, timestep]
        if grid.fine_mask is not None:
            parts.append(grid.fine_mask)
        parts += [v for _, v in sorted(cond.data.items()) if isinstance(v, torch.Tensor)]
        return torch.cat([self._bits(p.to(self.device)) for p in parts])

    def check_same(self, tokens, grid, timestep, cond) -> None:
        """Compare this call's inputs across ranks; :class:`RanksDivergedError` (on every rank) if they differ."""
        fp = self.fingerprint(tokens, grid, timestep, cond)
        lens = all_gather_flat(torch.tensor([fp.numel()], device=self.device), self.flat).view(-1).tolist()
        if len(set(lens)) > 1:
            raise RanksDivergedError(f"the ranks' model calls differ in structure (fingerprint lengths {lens})")
        prints = all_gather_flat(fp, self.flat)
        bad = [r for r in range(self.world) if not torch.equal(prints[r], prints[0])]
        if bad:
            raise RanksDivergedError(
                f"ranks {bad} hold other inputs than rank 0 for the same model call (tokens {tuple(tokens.shape)}): "
                "every rank must call generate with the same arguments -- the same seed or generator state, the "
                "same prompt or embeddings -- on the same kind of device")

    # ---- what generate wraps
    def wrap_velocity(self, velocity):
        """The call's model call, with the cross-rank input check at each stage's first call (a new token grid)."""
        def call(tokens, grid, timestep, cond):
            if grid is not self._last_grid:
                self.check_same(tokens, grid, timestep, cond)
                self._last_grid = grid
            return velocity(tokens, grid, timestep, cond)

        return call

    def wrap_decode(self, decode):
        """The call's VAE decode, with rank 0's images broadcast to all ranks."""
        def call(latents):
            return self.broadcast(decode(latents))

        return call
