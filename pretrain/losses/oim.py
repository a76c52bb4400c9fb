"""Online instance matching (OIM) loss with a look-up table (LUT) and a circular queue (CQ).

Semantics follow NAE/SeqNet (docs/protocol.md section 9): logits = scalar * x [LUT; CQ]^T, cross
entropy over labelled samples only, and in the backward pass (so the gradient uses the tables
the logits were computed with) every labelled sample moves its LUT row by momentum and
re-normalises it, while unlabelled samples (-1) overwrite the oldest queue slots.

Labels: ``>= 0`` an identity (a LUT row), ``-1`` an unlabelled person (goes to the queue only).
Unlike NAE there is no 5555 sentinel and no ``pid - 1`` shift; background never reaches here.

The table update happens when autograd runs this node's backward: no backward (eval, no_grad,
frozen embeddings) means no update.  With torch.distributed initialised and world > 1 the
update uses the features and labels of every rank (all_gather, rank order), so the LUT, CQ and
queue header stay identical on every rank; the loss itself uses the local features only.
Callers must therefore run backward through every OIM call on every rank (the model always
calls it, with zero rows if need be).

``sample`` > 0 (``model.oim_sample``) switches to a partial-FC style approximation whose cost
barely depends on the number of identities N: each call scores the batch's own identities plus
distinct LUT rows drawn uniformly at random up to ``sample`` rows in all (and the whole queue),
so the logits are n x (sample + Q) instead of n x (N + Q).  The draw is O(sample log sample)
(no O(N) permutation), seeded by (seed, rank, call number); with ``sample >= N`` every row is
scored and the loss equals the full OIM.  The table update is the same as the full OIM's.
The call counter is not part of the state dict (the keys stay those of the full OIM), so a
resumed run restarts the draw sequence.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_SYNC: dict[str, object] = {"world": None, "group": None}


def init_sync_group() -> None:
    """Create the process group of the table sync; call once at setup on every rank.

    ``dist.new_group`` is a collective: every rank must call it at the same point of the
    program.  Inside backward (where the update runs) ranks reach it in a data-dependent
    order, so it is created here, at setup, and :func:`sync_group` only looks it up.
    Re-creates the group when the default group changed (a re-initialised process group).
    """
    if _world_size() == 1:
        return
    if _SYNC["world"] is not dist.group.WORLD:
        _SYNC.update(world=dist.group.WORLD, group=dist.new_group())


def sync_group():
    """The process group of the table sync (None when not distributed).

    A group of our own: the gathers run inside autograd's backward while DDP all-reduces
    gradient buckets on the default group; the relative order of the two streams of
    collectives may differ between ranks (data-dependent graphs), which on one shared
    communicator could deadlock.  Raises when :func:`init_sync_group` was not called.
    """
    if _world_size() == 1:
        return None
    if _SYNC["world"] is not dist.group.WORLD:
        raise RuntimeError("OIM: call pretrain.losses.oim.init_sync_group() on every rank at setup "
                           "(after the process group is initialised, before the first step)")
    return _SYNC["group"]


def gather_rows(x: torch.Tensor, labels: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (x, labels) of every rank in rank order; counts may differ between ranks."""
    world = _world_size()
    if world == 1:
        return x, labels
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    most = max(sizes)
    # all_gather needs equal shapes: pad every rank to the largest count, then trim.
    x_pad = x.new_zeros((most, x.shape[1]))
    x_pad[: x.shape[0]] = x
    l_pad = labels.new_full((most,), -2)
    l_pad[: labels.shape[0]] = labels
    xs = [torch.empty_like(x_pad) for _ in range(world)]
    ls = [torch.empty_like(l_pad) for _ in range(world)]
    dist.all_gather(xs, x_pad.contiguous(), group=group)
    dist.all_gather(ls, l_pad.contiguous(), group=group)
    return (torch.cat([t[:n] for t, n in zip(xs, sizes)]),
            torch.cat([t[:n] for t, n in zip(ls, sizes)]))


def occurrence_index(labels: torch.Tensor) -> torch.Tensor:
    """For each element, how many earlier elements carry the same label (0 for the first)."""
    if labels.numel() == 0:
        return labels.clone()
    sorted_labels, perm = torch.sort(labels, stable=True)
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    occ = torch.empty_like(labels)
    occ[perm] = torch.arange(labels.numel(), device=labels.device) - starts
    return occ


class _Match(torch.autograd.Function):
    """x -> x_known [LUT; CQ]^T, with the table update in backward (NAE's OIM autograd function).

    Only labelled rows get similarities (unlabelled rows have no target, NAE ignores their
    logits); every row still reaches the table update.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, labels: torch.Tensor, oim: "OIMLoss") -> torch.Tensor:
        ctx.oim = oim
        ctx.save_for_backward(x, labels)
        return oim.similarities(x[labels >= 0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, labels = ctx.saved_tensors
        oim: OIMLoss = ctx.oim
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
            grad_x[labels >= 0] = oim.project(grad).to(x.dtype)
        oim.update(x.detach(), labels)
        return grad_x, None, None


def sample_columns(positives: torch.Tensor, num_pids: int, size: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Sorted LUT rows to score: every row of ``positives`` (unique, CPU) plus distinct rows
    drawn uniformly without replacement from the others, ``max(size, len(positives))`` in all
    (capped at ``num_pids``).  Cost O(size log size) unless more than half of the other rows
    are wanted, where one permutation of them (O(N)) is as cheap."""
    positives = positives.to(torch.long)
    want = min(size, num_pids) - positives.numel()
    if want <= 0:
        return torch.sort(positives).values
    free = num_pids - positives.numel()
    if 2 * want > free:
        mask = torch.ones(num_pids, dtype=torch.bool)
        mask[positives] = False
        others = torch.nonzero(mask).squeeze(1)
        negatives = others[torch.randperm(free, generator=generator)[:want]]
    else:
        # The first `want` distinct non-positive values of an i.i.d. uniform sequence are a
        # uniform random subset; 2*want draws leave at least half of the others unpicked, so
        # one round nearly always suffices.
        negatives = torch.empty(0, dtype=torch.long)
        while negatives.numel() < want:
            draw = torch.randint(num_pids, (2 * want,), generator=generator)
            cand = torch.cat([negatives, draw])
            cand = cand[occurrence_index(cand) == 0]
            negatives = cand[~torch.isin(cand, positives)][:want]
    return torch.sort(torch.cat([positives, negatives])).values


class _SampledMatch(torch.autograd.Function):
    """x -> x_known W^T for a gathered bank W = [LUT[cols]; CQ] (fp32), table update in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, oim: "OIMLoss") -> torch.Tensor:
        ctx.oim = oim
        ctx.save_for_backward(x, labels, bank)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return x[labels >= 0].float() @ bank.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, labels, bank = ctx.saved_tensors
        oim: OIMLoss = ctx.oim
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
            with torch.autocast(device_type=grad.device.type, enabled=False):
                grad_x[labels >= 0] = (grad.float() @ bank).to(x.dtype)
        oim.update(x.detach(), labels)
        return grad_x, None, None, None


class OIMLoss(nn.Module):
    """OIM loss module; buffers ``lut`` [num_pids,D], ``cq`` [cq_size,D], ``header_cq`` (int64).

    ``lut_dtype`` bfloat16/float16 halves the table memory (10^6 ids x 256 = 1 GB in fp32); the
    matrix products still run in fp32 on ``chunk`` rows at a time, so nothing larger than the
    logits of the labelled rows (n_labelled x (N+Q)) is materialised.
    """

    def __init__(self, dim: int, num_pids: int, cq_size: int, momentum: float = 0.5,
                 scalar: float = 30.0, lut_dtype: str = "float32", chunk: int = 65536,
                 sample: int = 0, sample_seed: int | None = None) -> None:
        super().__init__()
        if lut_dtype not in DTYPES:
            raise ValueError(f"lut_dtype must be one of {sorted(DTYPES)}, got {lut_dtype!r}")
        if sample < 0:
            raise ValueError(f"sample must be >= 0 (0 = full OIM), got {sample}")
        self.dim, self.num_pids, self.cq_size = dim, num_pids, cq_size
        self.momentum, self.scalar, self.chunk = momentum, scalar, chunk
        # sample_seed None: torch.initial_seed() at the first call, i.e. the run's seed
        # (set_seed before the model is built), without consuming the global RNG stream.
        self.sample, self.sample_seed = sample, sample_seed
        self.sample_calls = 0
        self.last_columns: torch.Tensor | None = None   # the LUT rows of the last sampled call
        self.register_buffer("lut", torch.zeros(num_pids, dim, dtype=DTYPES[lut_dtype]))
        self.register_buffer("cq", torch.zeros(cq_size, dim, dtype=DTYPES[lut_dtype]))
        self.register_buffer("header_cq", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ table products
    def _banks(self) -> list[torch.Tensor]:
        return [self.lut, self.cq]

    def similarities(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,D] -> x [LUT; CQ]^T as float32 [B, N+Q] (no scalar)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            out = x.new_empty((x.shape[0], self.num_pids + self.cq_size))
            col = 0
            for bank in self._banks():
                for s in range(0, bank.shape[0], self.chunk):
                    part = bank[s: s + self.chunk]
                    out[:, col + s: col + s + part.shape[0]] = x @ part.float().t()
                col += bank.shape[0]
        return out

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """grad [B, N+Q] -> grad [LUT; CQ], i.e. the gradient with respect to x."""
        with torch.autocast(device_type=grad.device.type, enabled=False):
            grad = grad.float()
            out = grad.new_zeros((grad.shape[0], self.dim))
            col = 0
            for bank in self._banks():
                for s in range(0, bank.shape[0], self.chunk):
                    part = bank[s: s + self.chunk]
                    out += grad[:, col + s: col + s + part.shape[0]] @ part.float()
                col += bank.shape[0]
        return out

    # ------------------------------------------------------------------ loss
    def adjust_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Hook on the cosine logits of the labelled rows (before the scalar); OIM: unchanged.
        :class:`pretrain.losses.fc.FCLoss` puts its angular margin on the target column here."""
        return cos

    def forward(self, x: torch.Tensor, labels: torch.Tensor,
                positive: tuple[torch.Tensor, torch.Tensor] | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """Mean cross entropy over samples with label >= 0; returns a graph-connected 0 if none.

        ``positive`` = (vectors [B,D], mask [B] bool), optional: for the rows in ``mask`` the
        logit of the row's own identity uses the given vector (detached, normalised) instead
        of its LUT row -- the two-view positive of the hybrid objective for pseudo-identities
        whose row is empty or one epoch stale.  The tables are not changed by it.
        ``reduction="none"`` gives the per-row losses of the labelled rows (in row order).
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if x.dim() != 2 or x.shape[1] != self.dim or labels.shape != (x.shape[0],):
            raise ValueError(f"OIM expects x [B,{self.dim}] and labels [B], got {tuple(x.shape)} "
                             f"and {tuple(labels.shape)}")
        labels = labels.to(device=x.device, dtype=torch.long)
        if labels.numel() and (int(labels.max()) >= self.num_pids or int(labels.min()) < -1):
            raise ValueError(f"OIM labels must lie in [-1, {self.num_pids - 1}] (num_pids={self.num_pids}), "
                             f"got min {int(labels.min())} max {int(labels.max())}")
        known = labels >= 0
        targets = labels[known]
        if self.sample > 0:
            logits, targets = self._sampled_logits(x, labels, targets)   # [n_labelled, S+Q]
        else:
            logits = _Match.apply(x, labels, self)     # [n_labelled, N+Q] cosine similarities
        if logits.shape[0] == 0:
            return logits.sum() * 0.0 if reduction == "mean" else logits.sum(dim=1) * 0.0
        if positive is not None:
            vectors, mask = positive
            sel = mask.to(x.device).bool()[known]
            if bool(sel.any()):
                rows = torch.nonzero(sel, as_tuple=True)[0]
                target = F.normalize(vectors[known][rows].detach().float(), dim=1)
                values = (x[known][rows].float() * target).sum(dim=1).to(logits.dtype)
                logits = logits.index_put((rows, targets[rows]), values)
        logits = self.adjust_logits(logits, targets)        # targets: column positions (also when sampled)
        return F.cross_entropy(logits * self.scalar, targets, reduction=reduction)

    def _sampled_logits(self, x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits over [LUT[cols]; CQ] and the targets as column positions (see module doc)."""
        if self.sample_seed is None:
            self.sample_seed = torch.initial_seed()
        seed = self.sample_seed
        rank = dist.get_rank() if _world_size() > 1 else 0
        gen = torch.Generator().manual_seed(hash((seed, rank, self.sample_calls)) & (2 ** 63 - 1))
        self.sample_calls += 1
        positives = torch.unique(targets).cpu()
        cols = sample_columns(positives, self.num_pids, self.sample, gen).to(x.device)
        self.last_columns = cols
        bank = torch.cat([self.lut[cols].float(), self.cq.float()])
        logits = _SampledMatch.apply(x, labels, bank, self)
        return logits, torch.searchsorted(cols, targets)

    # ------------------------------------------------------------------ table update
    @torch.no_grad()
    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Apply the NAE update for (x, labels) of every rank, in order."""
        x, labels = gather_rows(x.float(), labels, sync_group())
        known = labels >= 0
        self._update_lut(x[known], labels[known])
        self._push_queue(x[labels == -1])

    def _update_lut(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        # Sequential per-sample updates are order dependent only within one identity, so the
        # k-th occurrences of all identities are applied together, k = 0, 1, ...
        occ = occurrence_index(labels)
        rounds = int(occ.max()) + 1 if occ.numel() else 0
        m = self.momentum
        for k in range(rounds):
            sel = occ == k
            ids = labels[sel]
            rows = m * self.lut[ids].float() + (1.0 - m) * x[sel]
            self.lut[ids] = F.normalize(rows, dim=1, eps=1e-12).to(self.lut.dtype)

    def _push_queue(self, x: torch.Tensor) -> None:
        n, q = x.shape[0], self.cq_size
        if n == 0 or q == 0:
            return
        head = int(self.header_cq)
        slots = (head + torch.arange(n, device=x.device)) % q
        keep = min(n, q)   # with more samples than slots, only the last q survive
        self.cq[slots[-keep:]] = x[-keep:].to(self.cq.dtype)
        self.header_cq.fill_((head + n) % q)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_pids={self.num_pids}, cq_size={self.cq_size}, "
                f"momentum={self.momentum}, scalar={self.scalar}, lut_dtype={self.lut.dtype}, "
                f"sample={self.sample or 'all'}")
