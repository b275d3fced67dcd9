"""Sequential calibration spread over processes with ``torch.distributed`` (gloo on CPU, NCCL
on CUDA: one code path, the backend follows the model's device).

Every rank calls ``quantize_model`` with the same model, config and calibration; inside a
process group of ``W > 1`` ranks the work splits as follows.

- **Windows.** The calibration batches (``batch_size`` windows each, exactly those one
  process makes) are split into ``W`` contiguous runs: rank ``r`` gets batches
  ``[⌊r·n/W⌋, ⌊(r+1)·n/W⌋)`` and runs every block forward on those only, keeping only their
  activations (the memory of one block's activations drops by ``W``).
- **Hessians.** ``H = Σ_b P_b`` with ``P_b = X_bᵀX_b`` the Gram matrix of batch ``b``'s
  non-padded rows (``HessianAccumulator``: unnormalised sums, token counts beside them), so
  ``H`` is a sum over ranks. Two ways to add it up (``hessian_reduce``):

  * ``"ordered"`` (default): each rank keeps its partials ``P_b`` (fp32). A running sum
    passes rank 0 → 1 → … → ``W−1``; each rank adds its partials in batch order to what it
    received, and the last rank broadcasts the total. These are the very additions, in the
    very order, that one process makes, so ``H`` — and every code — is bit-identical to the
    single-process run. Cost per Hessian ``[K, K]``: ``n/W`` partials of ``4K²`` bytes held
    per rank, ``W−1`` point-to-point sends and one broadcast of ``4K²`` bytes, one after
    another (``W`` hops of latency).
  * ``"sum"``: each rank adds its partials in fp64; one ``all_reduce(SUM)`` in fp64; rounded
    once to fp32. ``8K²`` bytes per rank held and all-reduced; ``H`` differs from the
    one-process fp32 sum by rounding only (≈ 1e-7 relative).

  Token counts are reduced with ``SUM`` in int64; ``ReduceOp.AVG`` is never used.
- **Solves.** A stage's linears (and an MoE part's experts) are jobs of cost
  ``rows·cols²``, given largest first to the least loaded rank (ties: the lowest rank); the
  owner solves, and its result (``torch.save`` bytes) is broadcast from it, so every rank
  installs the same quantized weights and continues with the same model.
- **Block tuning** (``tuning``, after a block's codes are fixed): every Adam step draws its
  batch and windows from one generator seeded alike on every rank, over the *global*
  batches (``layout``); the rank holding that batch computes the gradient and broadcasts it
  (``share_gradients``), and every rank takes the same step from the same state — the steps
  one process takes, bit for bit. The losses over all windows that decide whether the tuned
  block is kept are per-batch sums gathered exactly (``gather_batch_sums``) and added up in
  batch order, as one process adds them.
- **Same collectives everywhere.** Which collectives run, in which order, depends only on
  the model's structure and the number of batches, never on a rank's data: an expert that
  got no tokens on some rank still takes part in its reduction, adding nothing.
- **Failures.** A rank that raises or dies makes the others fail at their next collective
  (gloo sees the closed connection) or, if it hangs, after the process group's timeout; they
  raise ``BabaiError`` naming the collective. Only the lead rank (0) writes output.

``torchrun --nproc-per-node N -m babai_ao quantize …`` (or ``babai-ao quantize --nproc N``,
which launches it) sets the group up (``process_group``).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from babai_ao.errors import BabaiError
from babai_ao.lattice.hessian import HessianAccumulator, default_tiles

__all__ = ["REDUCTIONS", "Group", "RankHessian", "Traffic", "backend_for", "barrier",
           "gather_batch_sums", "hessian", "is_lead", "launched", "layout", "owner_of",
           "process_group", "rank", "reduce_hessians", "shard", "share_gradients", "solve_cost",
           "solve_spread", "start", "stop", "world_size"]

REDUCTIONS = ("ordered", "sum")
DEFAULT_TIMEOUT_S = 1800.0  # one rank may solve a large layer while the others wait
T = TypeVar("T")


@dataclass
class Traffic:
    """One collective this rank took part in: what, and its payload bytes on this rank; for a
    token-count reduction, the counts of this rank and of all ranks."""

    op: str
    nbytes: int
    tokens_here: tuple[int, ...] = ()
    tokens_all: tuple[int, ...] = ()


@dataclass
class Group:
    """The calibration's process group as ``quantize_model`` sees it."""

    rank: int
    world: int
    reduce: str
    device: torch.device  # where collective tensors live: cpu (gloo) or this rank's GPU (nccl)
    log: list[Traffic] = field(default_factory=list)
    sizes: tuple[int, ...] = ()  # windows in each of the calibration's batches (all ranks')


_ACTIVE: ContextVar[Group | None] = ContextVar("babai_ao_distributed", default=None)
LAST_LOG: list[Traffic] = []  # the traffic of this process's last distributed calibration


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA models, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    """Processes in the initialized group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_lead() -> bool:
    """Rank 0 of an initialized group, or a process on its own: the one that prints and
    writes."""
    return world_size() == 1 or dist.get_rank() == 0


@contextlib.contextmanager
def process_group(device: torch.device | str = "cpu",
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Join the group ``torchrun`` describes in the environment (``MASTER_ADDR``, ``RANK``,
    ``WORLD_SIZE``), backend by ``device``; every collective waits at most ``timeout_s``.
    Left (destroyed) on exit, also after an error."""
    if timeout_s <= 0:
        raise BabaiError(f"timeout {timeout_s} s must be positive")
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _guarded(op: str, fn: Callable[[], T]) -> T:
    """Run a collective; a peer's failure or a timeout becomes a one-line ``BabaiError``."""
    try:
        return fn()
    except (RuntimeError, dist.DistError) as e:  # DistBackendError, timeouts, closed peers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BabaiError(f"distributed calibration stopped at {op} on rank {dist.get_rank()}: "
                         f"another rank failed or did not answer within the timeout ({first}); "
                         "see the first rank's error above, fix it and run again") from e


def barrier(what: str = "barrier") -> None:
    """Wait until every rank gets here (no-op in one process); a failed rank raises."""
    if world_size() > 1:
        _guarded(what, dist.barrier)


# ---- entering and leaving a calibration ---------------------------------------------------
def start(batches: Sequence[T], reduce: str = "ordered"
          ) -> tuple[list[T], Token[Group | None] | None]:
    """This rank's share of ``batches`` (all of them in one process) and a token for
    ``stop``; from here until ``stop`` the calibration's Hessians and solves are shared."""
    if reduce not in REDUCTIONS:
        raise BabaiError(f"hessian_reduce={reduce!r}: choose one of {REDUCTIONS}")
    world = world_size()
    if world == 1:
        return list(batches), None
    rank = dist.get_rank()
    if len(batches) < world:
        raise BabaiError(f"{len(batches)} calibration batches cannot be split over {world} "
                         f"processes: pass at least {world} batches (more windows, or a "
                         "smaller batch_size) or use fewer processes")
    backend = dist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    sizes = tuple(int(b.input_ids.shape[0]) if hasattr(b, "input_ids") else 0 for b in batches)
    token = _ACTIVE.set(Group(rank, world, reduce, device, sizes=sizes))
    return shard(batches, rank, world), token


def stop(token: Token[Group | None] | None) -> None:
    """Leave the calibration ``start`` entered; its traffic stays in ``LAST_LOG``."""
    if token is None:
        return
    group = _ACTIVE.get()
    LAST_LOG[:] = group.log if group is not None else []
    _ACTIVE.reset(token)


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s contiguous run ``[⌊r·n/W⌋, ⌊(r+1)·n/W⌋)`` of ``items``."""
    n = len(items)
    return list(items[rank * n // world:(rank + 1) * n // world])


def layout() -> tuple[tuple[int, ...], int] | None:
    """``(windows of every batch of the whole calibration, index of this rank's first
    batch)`` inside a distributed calibration; ``None`` in one process."""
    group = _ACTIVE.get()
    if group is None:
        return None
    return group.sizes, group.rank * len(group.sizes) // group.world


def rank() -> int:
    """This process's rank in the distributed calibration (0 in one process)."""
    group = _ACTIVE.get()
    return 0 if group is None else group.rank


def owner_of(batch: int) -> int:
    """The rank that holds global batch ``batch`` (0 in one process)."""
    group = _ACTIVE.get()
    if group is None:
        return 0
    n = len(group.sizes)
    return next(r for r in range(group.world) if batch < (r + 1) * n // group.world)


def share_gradients(params: Sequence[torch.Tensor], src: int) -> None:
    """Every rank's ``p.grad`` := rank ``src``'s (which computed them), for each of
    ``params`` (the same list on every rank); no-op in one process. A parameter without a
    gradient on ``src`` has none anywhere."""
    group = _ACTIVE.get()
    if group is None:
        return
    here = group.rank == src
    has = torch.tensor([here and p.grad is not None for p in params], dtype=torch.uint8,
                       device=group.device)
    _log(group, "broadcast(has grad)", has)
    _guarded("broadcast(has grad)", lambda: dist.broadcast(has, src=src))
    for p, present in zip(params, has.tolist(), strict=True):
        if not present:
            p.grad = None
            continue
        grad = (p.grad.detach().to(group.device) if here else
                torch.empty(p.shape, dtype=p.dtype, device=group.device))
        _log(group, "broadcast(grad)", grad)
        _guarded("broadcast(gradient)", lambda g=grad: dist.broadcast(g, src=src))
        if not here:
            p.grad = grad.to(p.device)


def gather_batch_sums(values: Sequence[Sequence[float]], first: int, total: int
                      ) -> list[list[float]]:
    """Per-batch numbers of the whole calibration: ``values[j]`` are this rank's batch
    ``first + j``'s; the result has ``total`` rows, one per global batch, on every rank.
    Exact: fp64 ``all_reduce(SUM)`` of rows that are zero except on the batch's own rank."""
    group = _ACTIVE.get()
    if group is None:
        return [list(v) for v in values]
    width = len(values[0])  # (every rank holds at least one batch: start)
    rows = torch.zeros(total, width, dtype=torch.float64, device=group.device)
    for j, v in enumerate(values):
        rows[first + j] = torch.tensor(list(v), dtype=torch.float64)
    _log(group, "all_reduce(batch sums)", rows)
    _guarded("all_reduce(batch sums)", lambda: dist.all_reduce(rows, dist.ReduceOp.SUM))
    return rows.cpu().tolist()


# ---- Hessians -------------------------------------------------------------------------------
class RankHessian(HessianAccumulator):
    """This rank's share of a layer's ``H``: its batches' partials ``X_bᵀX_b`` in batch order
    (``ordered``) or their fp64 sum (``sum``); ``tokens`` counts this rank's rows."""

    def __init__(self, in_features: int, device: torch.device | str, reduce: str,
                 tiles: int | None = None) -> None:
        self.in_features, self.dtype, self.device = in_features, torch.float32, device
        self.tokens, self.reduce = 0, reduce
        self.tiles = default_tiles(in_features) if tiles is None else tiles
        self.partials: list[torch.Tensor] = []
        self.sum64: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        partial, tokens = self.batch_gram(x)
        if self.reduce == "ordered":
            self.partials.append(partial)
        elif self.sum64 is None:
            self.sum64 = partial.double()
        else:
            self.sum64 += partial
        self.tokens += tokens


def hessian(in_features: int, device: torch.device | str, tiles: int | None = None
            ) -> HessianAccumulator:
    """A new accumulator for one layer input: this rank's share inside a distributed
    calibration, a plain ``HessianAccumulator`` otherwise (``tiles``: each batch's
    ``X_bᵀX_b`` formed tile-wise, ``lattice.hessian.add_gram_tiles_``; ``None``: the
    process default, ``lattice.hessian.tiling``). Create it on the
    thread that called ``quantize_model`` (the group is a context variable; a new thread
    does not see it); ``add`` may run on any thread."""
    group = _ACTIVE.get()
    if group is None:
        return HessianAccumulator(in_features, device=device, tiles=tiles)
    return RankHessian(in_features, device, group.reduce, tiles)


AccT = TypeVar("AccT", dict, list)


def reduce_hessians(accs: AccT) -> AccT:
    """The whole calibration's ``H`` and token count of every accumulator in ``accs`` (a
    dict or list, the same keys in the same order on every rank), on every rank; unchanged
    in one process."""
    group = _ACTIVE.get()
    items = list(accs.values()) if isinstance(accs, dict) else list(accs)
    if group is None or not items:  # (no items: the same on every rank, nothing to send)
        return accs
    here = tuple(a.tokens for a in items)
    counts = torch.tensor(here, dtype=torch.int64, device=group.device)
    _guarded("all_reduce(token counts)", lambda: dist.all_reduce(counts, dist.ReduceOp.SUM))
    group.log.append(Traffic("all_reduce(tokens)", 8 * len(here), here,
                             tuple(counts.tolist())))
    totals = []
    for acc, tokens in zip(items, counts.tolist(), strict=True):
        total = HessianAccumulator(acc.in_features, device=acc.device)
        total.tokens = int(tokens)
        if tokens:  # all ranks agree: nobody sends an H that no rank has a token for
            total.hessian = (_ordered_sum(group, acc) if group.reduce == "ordered"
                             else _fp64_sum(group, acc)).to(acc.device)
        totals.append(total)
    if isinstance(accs, dict):
        return dict(zip(accs, totals, strict=True))
    return totals


def _ordered_sum(group: Group, acc: RankHessian) -> torch.Tensor:
    """``(…((0 + P_1) + P_2) + …)`` over all ranks' partials in global batch order: received
    from the rank before, extended with this rank's partials, sent on; the last rank
    broadcasts it."""
    k = acc.in_features
    total = torch.zeros(k, k, dtype=torch.float32, device=group.device)
    if group.rank > 0:
        _log(group, "recv(H)", total)
        _guarded("recv(Hessian)", lambda: dist.recv(total, src=group.rank - 1))
    for partial in acc.partials:
        total += partial.to(group.device)
    acc.partials.clear()
    if group.rank < group.world - 1:
        _log(group, "send(H)", total)
        _guarded("send(Hessian)", lambda: dist.send(total, dst=group.rank + 1))
    _log(group, "broadcast(H)", total)
    _guarded("broadcast(Hessian)", lambda: dist.broadcast(total, src=group.world - 1))
    return total


def _fp64_sum(group: Group, acc: RankHessian) -> torch.Tensor:
    """``Σ_ranks`` of the ranks' fp64 partial sums (``all_reduce(SUM)``), rounded to fp32."""
    k = acc.in_features
    local = (acc.sum64.to(group.device) if acc.sum64 is not None
             else torch.zeros(k, k, dtype=torch.float64, device=group.device))
    acc.sum64 = None
    _log(group, "all_reduce(H)", local)
    _guarded("all_reduce(Hessian)", lambda: dist.all_reduce(local, dist.ReduceOp.SUM))
    return local.float()


# ---- solves ---------------------------------------------------------------------------------
def solve_cost(rows: int, cols: int) -> int:
    """Work of one Babai/GPTQ solve of a ``[rows, cols]`` weight: ``rows·cols²``."""
    return rows * cols * cols


def owners(costs: Sequence[int], world: int) -> list[int]:
    """Largest job first to the least loaded rank (ties: lowest rank); deterministic."""
    load = [0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def solve_spread(jobs: Sequence[tuple[int, Callable[[], T]]],
                 device: torch.device | str = "cpu") -> list[T]:
    """Run ``jobs`` (``(cost, job)``) and return their results in order. In one process all
    run here; in a distributed calibration each runs on its owner (``owners``) and its result
    is broadcast from there, loaded onto ``device`` on every rank."""
    group = _ACTIVE.get()
    if group is None:
        return [job() for _, job in jobs]
    owner = owners([c for c, _ in jobs], group.world)
    mine = {i: job() for i, (_, job) in enumerate(jobs) if owner[i] == group.rank}
    return [_broadcast_result(group, mine.get(i), owner[i], device) for i in range(len(jobs))]


def _broadcast_result(group: Group, result: Any, src: int, device: torch.device | str) -> Any:
    size = torch.zeros(1, dtype=torch.int64, device=group.device)
    payload = b""
    if group.rank == src:
        buffer = io.BytesIO()
        torch.save(result, buffer)
        payload = buffer.getvalue()
        size[0] = len(payload)
    _guarded("broadcast(result size)", lambda: dist.broadcast(size, src=src))
    data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(group.device)
            if group.rank == src else
            torch.empty(int(size), dtype=torch.uint8, device=group.device))
    _log(group, "broadcast(result)", data)
    _guarded("broadcast(result)", lambda: dist.broadcast(data, src=src))
    if group.rank == src:
        return result
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location=device,
                      weights_only=False)


def _log(group: Group, op: str, tensor: torch.Tensor) -> None:
    group.log.append(Traffic(op, tensor.numel() * tensor.element_size()))
