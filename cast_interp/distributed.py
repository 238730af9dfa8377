"""Many processes, one experiment: CAST's independent pieces shared out over `torchrun` ranks.

A CAST experiment is a grid of independent pieces (arm x budget x training seed x random draw,
each a fine-tuning run and an evaluation), and stage 1 and stage 4 hold independent measurements
too (the exact S sweep's ablation passes, attribution's exact reverts and random revert sets).
On a multi-GPU node or a cluster they run on many processes launched by PyTorch's own launcher,

    torchrun --nproc-per-node 4 -m cast_interp.cli run --preset gpu --out runs/gpu
    srun --ntasks-per-node 1 torchrun --nnodes $SLURM_NNODES --nproc-per-node 4 \\
        --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 -m cast_interp.cli run ...

and this module is all they need to know of each other (`torch.distributed`: NCCL on GPUs, gloo
on CPU; each rank on its own device, `cuda:LOCAL_RANK`). The rules (ours):

- Assignment: work is a list in a deterministic order that every rank builds alike; rank r does
  items r, r + W, r + 2W, ... (round-robin, W the world size). The pipeline's list is the
  *missing* pieces of the plan, so a relaunch, with any number of ranks, redoes only those.
- Seeding belongs to the item, never to the rank: a piece is seeded by its training seed and
  draw, an ablation pass or a revert has no randomness. A piece's numbers do not depend on which
  rank ran it, or on how many ranks there were.
- What all ranks must agree on is decided by rank 0 and sent to the others (`main_only`,
  `map_shared` sends its list): a GPU's non-deterministic kernels could otherwise make two ranks
  build different lists from the same inputs.
- Rank 0 alone writes the shared files (config, run manifest, self-reference caches, the map,
  results, report, figures); every rank writes the pieces it ran (atomically, as one process does).
- An exception on one rank is raised on every rank at the next collective call, naming the rank,
  instead of leaving the others waiting.

Without `torchrun` (no `WORLD_SIZE` above 1 in the environment) nothing is initialised, the world
size is 1 and every helper is the plain loop: one process works exactly as before.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
BackendChoice = Literal["auto", "nccl", "gloo"]
# Longest wait at a collective call (ours): rank 0 alone writes the self-reference answers and
# waits for the slowest rank's last piece; both can take long on a large model. A dead rank does
# not make the others wait this long: torchrun stops the whole group when a worker fails.
DEFAULT_TIMEOUT_MIN = 180.0


class DistributedError(RuntimeError):
    """A distributed launch that cannot work (bad environment, backend, devices), or a failure on
    another rank; the message says which and what to do."""


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `world_size`, its rank on its node
    (`local_rank`, which picks its GPU) and the backend (None: one process, nothing initialised)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def _env_int(names: Sequence[str]) -> Optional[int]:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError as exc:
                raise DistributedError(f"${n}={v!r} is not an integer: check the launcher's "
                                       "environment (torchrun sets RANK, WORLD_SIZE, "
                                       "LOCAL_RANK).") from exc
    return None


def env_world() -> World:
    """The world the environment describes: torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    `LOCAL_WORLD_SIZE`, else SLURM's `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`,
    `SLURM_NTASKS_PER_NODE` (a bare `srun` with `MASTER_ADDR`/`MASTER_PORT` exported); a world
    of one when neither is there."""
    size = _env_int(["WORLD_SIZE"])
    if size is not None:
        rank, local = _env_int(["RANK"]), _env_int(["LOCAL_RANK"])
        local_size = _env_int(["LOCAL_WORLD_SIZE"]) or size
    elif (_env_int(["SLURM_NTASKS"]) or 1) > 1 and os.environ.get("MASTER_ADDR"):
        size, rank = _env_int(["SLURM_NTASKS"]), _env_int(["SLURM_PROCID"])
        local = _env_int(["SLURM_LOCALID"])
        per_node = (os.environ.get("SLURM_NTASKS_PER_NODE") or "").split("(")[0]
        local_size = int(per_node) if per_node.isdigit() else size
    else:
        return World()
    if size < 1 or rank is None or not 0 <= rank < size:
        raise DistributedError(f"The environment says WORLD_SIZE={size} but RANK={rank}: launch "
                               "with torchrun (or srun), which sets both.")
    local = rank if local is None else local
    return World(rank=rank, world_size=size, local_rank=local, local_world_size=local_size)


_WORLD: Optional[World] = None


def setup(device: Optional[str] = None, *, backend: BackendChoice = "auto",
          timeout_min: Optional[float] = None) -> Optional[str]:
    """Join the process group the launcher describes (once; later calls return at once) and
    return the device this rank should use.

    One process (no `WORLD_SIZE` > 1): nothing is initialised and `device` comes back unchanged.
    Under torchrun: `backend="auto"` takes NCCL when the ranks use CUDA (`device` None with a GPU
    present, or "cuda"), gloo otherwise; each CUDA rank gets `cuda:LOCAL_RANK`. `timeout_min`:
    the longest wait at a collective call (default 180, or `$CAST_DIST_TIMEOUT_MIN`).
    Raises `DistributedError` for NCCL without CUDA, more ranks on a node than GPUs, or a
    process group that does not form.
    """
    global _WORLD
    env = env_world()
    if env.world_size == 1:
        _WORLD = env
        return device
    import torch.distributed as dist

    if _WORLD is not None and _active():  # joined before (the CLI, then run_experiment)
        if device in (None, "cuda") and _WORLD.backend == "nccl":
            return f"cuda:{_WORLD.local_rank}"
        return device

    if backend not in ("auto", "nccl", "gloo"):
        raise DistributedError(f"backend must be 'auto', 'nccl' or 'gloo', got {backend!r}.")
    cuda = torch.cuda.is_available()
    wants_cuda = (device is None and cuda) or (device is not None
                                                and torch.device(device).type == "cuda")
    chosen = backend if backend != "auto" else ("nccl" if wants_cuda else "gloo")
    if chosen == "nccl":
        if not cuda:
            raise DistributedError("The NCCL backend needs CUDA GPUs and this machine has none: "
                                   "use --dist-backend gloo (CPU ranks), or launch on GPUs.")
        if device is not None and torch.device(device).type != "cuda":
            raise DistributedError(f"The NCCL backend runs on CUDA, but --device {device} was "
                                   "given: use --dist-backend gloo for CPU ranks.")
        n_gpu = torch.cuda.device_count()
        if env.local_world_size > n_gpu or env.local_rank >= n_gpu:
            raise DistributedError(
                f"{env.local_world_size} ranks on this node but {n_gpu} GPU(s): each rank needs "
                f"its own GPU (cuda:LOCAL_RANK). Launch --nproc-per-node {n_gpu} or fewer.")
        torch.cuda.set_device(env.local_rank)
        device = f"cuda:{env.local_rank}"
    elif wants_cuda and device in (None, "cuda"):
        device = f"cuda:{env.local_rank % max(torch.cuda.device_count(), 1)}"
    if dist.is_initialized():
        _WORLD = World(**{**env.to_dict(), "backend": dist.get_backend()})
        return device
    if timeout_min is None:
        timeout_min = float(os.environ.get("CAST_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={env.world_size} but {', '.join(missing)} not set: "
                               "launch with torchrun, or export MASTER_ADDR and MASTER_PORT for "
                               "srun.")
    try:
        dist.init_process_group(chosen, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(minutes=timeout_min))
    except Exception as exc:
        raise DistributedError(
            f"Rank {env.rank} of {env.world_size} could not join the {chosen} process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({exc}). Check that "
            "every rank was started by the same torchrun/srun job and can reach that address."
        ) from exc
    _WORLD = World(**{**env.to_dict(), "backend": chosen})
    return device


def teardown() -> None:
    """Leave the process group (if this process joined one)."""
    global _WORLD
    if _active():
        import torch.distributed as dist

        dist.destroy_process_group()
    _WORLD = None


def world() -> World:
    """This process's `World` (a world of one before `setup`, or without torchrun)."""
    return _WORLD if _WORLD is not None and _active() else World()


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return world().rank


def world_size() -> int:
    return world().world_size


def is_main() -> bool:
    """Whether this process is rank 0 (always, for one process): the one that writes shared files."""
    return world().rank == 0


def barrier() -> None:
    """Wait until every rank is here (nothing to wait for with one process)."""
    if _active():
        import torch.distributed as dist

        dist.barrier()


def share(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: items r, r + W, r + 2W, ... (all of them for one process)."""
    w = world()
    return list(items)[w.rank::w.world_size]


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _Failed:
    """What a rank sends instead of a result when its work raised."""

    def __init__(self, rank_: int, exc: BaseException):
        self.rank = rank_
        self.message = f"{type(exc).__name__}: {exc}"
        self.trace = traceback.format_exc()


def _raise_failures(values: Sequence[Any], own: Optional[BaseException]) -> None:
    failed = [v for v in values if isinstance(v, _Failed)]
    if own is not None:
        raise own
    if failed:
        f = failed[0]
        raise DistributedError(f"rank {f.rank} failed ({f.message}); this rank stops too. That "
                               f"rank's traceback:\n{f.trace}")


def main_only(fn: Callable[[], R]) -> R:
    """Run `fn` on rank 0 alone and return its result on every rank (one process: `fn()`).

    For work whose result all ranks must share and whose files only one rank may write (a cached
    answer file, the run directory's manifest). An exception in `fn` is raised on rank 0 and,
    as a `DistributedError` naming it, on every other rank."""
    if not _active():
        return fn()
    own, value = None, None
    if is_main():
        try:
            value = fn()
        except Exception as exc:  # sent to the others, then raised here
            own, value = exc, _Failed(0, exc)
    value = _broadcast(value)
    _raise_failures([value], own)
    return value


def map_shared(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`[fn(x) for x in items]`, the items shared out round-robin over the ranks; every rank gets
    the whole list, in order. Rank 0's `items` are the ones done (sent to the others first).

    `fn` must depend on its item alone (its own seeds), so the results equal one process's. After
    an exception a rank stops its share; every rank then raises it (`DistributedError` on the
    others). Results travel pickled: return what is needed (tensors on CPU), not models."""
    if not _active():
        return [fn(x) for x in items]
    import torch.distributed as dist

    items = list(_broadcast(list(items) if is_main() else None))
    w = world()
    mine: list[Any] = []
    own: Optional[BaseException] = None
    for x in items[w.rank::w.world_size]:
        try:
            mine.append(fn(x))
        except Exception as exc:
            own = exc
            mine = [_Failed(w.rank, exc)]
            break
    gathered: list[Any] = [None] * w.world_size
    dist.all_gather_object(gathered, mine)
    _raise_failures([v for part in gathered for v in part], own)
    out: list[Any] = [None] * len(items)
    for r, part in enumerate(gathered):
        out[r::w.world_size] = part
    return out
