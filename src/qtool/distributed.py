"""Quantization by several processes, on one machine or several (``torchrun``), on
``torch.distributed``. In a single process every helper here is the identity and nothing
is imported or initialised, so a single-process run is byte for byte what it was.

How a run is shared (``torchrun --nproc-per-node N -m qtool quantize ...``; several
machines: ``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``):

- ``init`` joins the process group torchrun describes (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``): ``gloo`` on CPU; ``cpu:gloo,cuda:nccl`` with ``--device cuda`` (CUDA
  tensors through NCCL, each process on the GPU of its ``LOCAL_RANK``; objects and CPU
  tensors through gloo).
- Calibration: the single process's chunks (``--batch-size`` samples each, or one
  image-text sample) are dealt out, chunk ``i`` to rank ``i mod N``
  (``local_calibration``). A process captures and propagates only its own chunks, so it
  holds about 1/N of the activations and runs 1/N of the forward passes. The AWQ search
  subsample (the leading chunks) is spread over the ranks the same way: each rank scores
  the candidates on its own search chunks, so with the default search size (one chunk of
  8 x 512 tokens) the module-scored scale search runs on rank 0 alone.
- Statistics are summed over the processes before they are used: GPTQ Hessians with
  their token counts (``mean_over_ranks``: MoE experts' token counts are the run's),
  AWQ's per-channel sums, Gram matrices and token counts, and the AWQ scale-search losses
  (``sum_floats``), so every process picks the same scales.
- Work shared out: GPTQ solves linear ``j`` of a block (its index in the block's linears)
  on rank ``j mod N``, AWQ's clip search likewise; each result is broadcast from that rank
  (``broadcast``) and every process writes it back, so the blocks stay identical on every
  process and N processes take about 1/N of the solve time (within a group of linears
  solved together: q/k/v, gate/up, a MoE stage's experts).
- Rank 0 alone writes, the work folder and the checkpoint. The next block's inputs are
  gathered to it in the single process's chunk order (``gather_chunks``), so the work
  folder is the one a single process writes: a run stopped under torchrun resumes with
  any number of processes, or in one. The other processes wait at a barrier while rank 0
  writes the checkpoint, then return (the CLI prints one line on stderr).
- Progress and logs below ERROR only on rank 0.
- Errors: a process that fails prints its one-line error and exits; the collective its
  peers are in (or enter next) then fails at once, the connection being closed, and they
  stop with ``PeerStopped`` (torchrun also stops the others when one exits with an error).
  ``TIMEOUT`` bounds a collective whose peer hangs. A stop signal (Ctrl-C) is agreed at
  each block boundary (``any_rank``), so every process stops after the same block.

Numerics. A chunk's activations are computed exactly as in one process (the same
samples, batched the same way, the same operations); each solve and search is the same
function of the same statistics. What changes is the order of the sums over chunks: a
sum becomes a sum of per-process partial sums (GPTQ: the per-process running means
combined as ``sum_r N_r H_r / N``). That moves statistics by float32 rounding (relative
1e-7). A discrete decision that lies that close to its threshold (a code on a rounding
boundary, nearly equal ``diag(H)`` entries in GPTQ's act-order, nearly equal losses on
AWQ's grids) can then go the other way, and what follows it differs for real (GPTQ's
error feedback, the next layers' statistics): the checkpoint is another, equally good
one, not a byte-for-byte copy. ``tests/test_distributed.py`` states what it asserts
(rounding-level agreement before any such decision, every layer's error within 5% after)
and the measurements behind it. Compare runs with the same ``OMP_NUM_THREADS`` per
process: CPU kernels may sum in another order with another thread count.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtool.errors import QtoolError, UserInputError

if TYPE_CHECKING:
    import torch

# a collective whose peer neither answers nor closes its connection fails after this long;
# it also bounds the wait of the other processes while rank 0 writes the checkpoint
TIMEOUT = datetime.timedelta(minutes=30)

_owned_group = False  # whether ``init`` created the process group (``shutdown`` destroys only that one)


class PeerStopped(QtoolError):
    """Another process of the distributed run failed (it printed its own error)."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        """Rank 0: the process that writes and reports."""
        return self.rank == 0


def env_world() -> World:
    """The world torchrun describes in the environment (one process without torchrun);
    reads the environment only, imports nothing."""
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def current() -> World:
    """The world of the initialised default process group, or one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> torch.device:
    """Join the process group of a torchrun launch (created once; an existing default
    group is used as it is) and return this process's compute device: ``cuda`` becomes
    ``cuda:LOCAL_RANK`` (an explicit ``cuda:K`` is kept). One process: ``device``."""
    global _owned_group
    import torch
    import torch.distributed as dist

    world = env_world()
    if world.size == 1 and not (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise UserInputError(f"WORLD_SIZE={world.size} asks for {world.size} processes but this torch has no "
                             "torch.distributed: install a torch build with it, or run without torchrun")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        _owned_group = True
    return device


def shutdown() -> None:
    """Destroy the process group ``init`` created (none created: nothing to do)."""
    global _owned_group
    if _owned_group:
        import torch.distributed as dist

        _owned_group = False
        if dist.is_initialized():
            dist.destroy_process_group()


def _collective(fn, *args, **kwargs):
    """Run one torch.distributed call; a peer that failed (closed connection) or hung
    (``TIMEOUT``) makes it a one-line ``PeerStopped``."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # gloo/NCCL report a lost peer or a timeout as RuntimeError (DistBackendError)
        raise PeerStopped("another process of this distributed run failed or stopped answering (its error is "
                          "printed above): fix that and rerun the same command, with --resume to continue after "
                          "the finished blocks") from exc


# -- calibration chunks ---------------------------------------------------------------


def local_calibration(input_ids: torch.Tensor | list, batch_size: int) -> torch.Tensor | list:
    """This process's calibration chunks, in the form ``capture_inputs`` takes: chunk
    ``i`` (rows ``i*batch_size`` up to ``(i+1)*batch_size`` of an int64 ``[n, seqlen]``
    tensor, or item ``i`` of a list of image-text samples) goes to rank ``i mod N``.
    The chunks keep their rows, so batching them again by ``batch_size`` gives the same
    chunks. Every process needs at least one chunk, else ``UserInputError``."""
    import torch

    world = current()
    if world.size == 1:
        return input_ids
    count = len(input_ids) if isinstance(input_ids, list) else -(-input_ids.shape[0] // batch_size)
    if count < world.size:
        raise UserInputError(f"{count} calibration chunk(s) of --batch-size {batch_size} cannot be shared by "
                             f"{world.size} processes (each needs one): pass --nsamples {world.size * batch_size} "
                             "or more, a smaller --batch-size, or start fewer processes")
    mine = range(world.rank, count, world.size)
    if isinstance(input_ids, list):
        return [input_ids[i] for i in mine]
    return torch.cat([input_ids[i * batch_size : (i + 1) * batch_size] for i in mine])


def local_chunks(chunks: list) -> list:
    """This process's items of a list in the single process's chunk order (rank ``i mod N``)."""
    world = current()
    return chunks if world.size == 1 else chunks[world.rank :: world.size]


def local_prefix(count: int) -> int:
    """How many of this process's chunks are among the first ``count`` of the run."""
    world = current()
    return count if world.size == 1 else len(range(world.rank, count, world.size))


def _merge(per_rank: list[list]) -> list:
    """Per-rank lists of chunks (rank ``i mod N`` holds chunk ``i``) back in chunk order."""
    total = sum(len(part) for part in per_rank)
    return [per_rank[i % len(per_rank)][i // len(per_rank)] for i in range(total)]


def all_chunks(values: list) -> list:
    """Every process's per-chunk ``values`` (small picklable items), in the run's chunk order."""
    import torch.distributed as dist

    world = current()
    if world.size == 1:
        return values
    per_rank: list[Any] = [None] * world.size
    _collective(dist.all_gather_object, per_rank, values)
    return _merge(per_rank)


def gather_chunks(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Every process's CPU chunk tensors on rank 0, in the run's chunk order (what one
    process would hold); None on the other ranks. One process: ``tensors``."""
    import torch
    import torch.distributed as dist

    world = current()
    if world.size == 1:
        return tensors
    metas = all_chunks([(tuple(t.shape), t.dtype) for t in tensors])
    if not world.leader:
        for t in tensors:
            _collective(dist.send, t.contiguous(), dst=0)
        return None
    per_rank = [list(tensors)]
    for rank in range(1, world.size):
        received = []
        for shape, dtype in metas[rank :: world.size]:
            buf = torch.empty(shape, dtype=dtype)
            _collective(dist.recv, buf, src=rank)
            received.append(buf)
        per_rank.append(received)
    return _merge(per_rank)


# -- reductions -----------------------------------------------------------------------


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes, in place (returned for convenience)."""
    import torch.distributed as dist

    if current().size > 1:
        _collective(dist.all_reduce, tensor)
    return tensor


def sum_counts(count: int) -> int:
    """An integer (tokens, rows) summed over the processes."""
    import torch

    if current().size == 1:
        return count
    return int(all_reduce_sum(torch.tensor([count], dtype=torch.int64)).item())


def sum_floats(values: list[float]) -> list[float]:
    """Python floats summed elementwise over the processes (in float64)."""
    import torch

    if current().size == 1:
        return values
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def mean_over_ranks(mean: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """The run's mean from each process's ``mean`` over its ``count`` rows:
    ``(sum_r count_r * mean_r / total, total)`` (a new tensor; zeros when no process
    saw a row). One process: ``(mean, count)`` unchanged."""
    if current().size == 1:
        return mean, count
    total = sum_counts(count)
    weighted = all_reduce_sum(mean * count)
    return (weighted / total if total else weighted), total


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any."""
    return sum_counts(int(flag)) > 0 if current().size > 1 else flag


# -- shared-out work ------------------------------------------------------------------


def owner(index: int) -> int:
    """The rank that does work item ``index`` (``index mod N``)."""
    return index % current().size


def owns(index: int) -> bool:
    """Whether this process does work item ``index``."""
    return owner(index) == current().rank


def broadcast(obj: Any, src: int) -> Any:
    """``obj`` as rank ``src`` holds it, on every process (its tensors on CPU on the
    receivers; ``src`` keeps its own object). One process: ``obj``."""
    import torch.distributed as dist

    world = current()
    if world.size == 1:
        return obj
    box = [_to_cpu(obj) if world.rank == src else None]
    _collective(dist.broadcast_object_list, box, src=src)
    return obj if world.rank == src else box[0]


def _to_cpu(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_cpu(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def barrier() -> None:
    """Wait until every process gets here (at most ``TIMEOUT``)."""
    import torch.distributed as dist

    if current().size > 1:
        _collective(dist.barrier)
