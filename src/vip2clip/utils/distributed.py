"""Several processes (ranks) on one or several machines, launched by `torchrun`: the process group and its helpers.

`init_from_env` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) and joins the
process group: NCCL when the requested device is CUDA (each rank on `cuda:LOCAL_RANK`), Gloo on the CPU (each
rank with its share of the machine's cores as threads). Without that environment, or with WORLD_SIZE 1, it
returns `LOCAL`, the one-process world: no process group, and every helper below is a plain local operation,
so one-process runs behave exactly as without this module.

Library functions take a `world: World = LOCAL` and use its helpers: `share` (a deterministic, disjoint,
contiguous share of N items in whole batches), `gather` (Python objects to rank 0, in rank order), `broadcast`,
`sum_` (tensors), `barrier`, `main_first`. Python objects travel over a Gloo group even when the main backend is
NCCL, so gathering results never takes GPU memory. `close` ends the process group cleanly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

logger = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_object_group: Any = None  # the Gloo group for Python objects (the default group when it is Gloo itself)


class RankFailedError(RuntimeError):
    """A collective operation broke off because another rank stopped (its own error is reported by that rank)."""


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as error:  # torch's DistError and Gloo's "Connection closed by peer" alike
        first_line = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).splitlines() or [type(error).__name__])[0])[:120]
        raise RankFailedError(f"another rank stopped during {what} ({first_line})") from error


def record_error(message: str) -> None:
    """Leave `message` where torchrun's failure summary looks for this rank's error (TORCHELASTIC_ERROR_FILE)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as stream:
            info = {"py_callstack": message, "timestamp": str(int(time.time()))}
            json.dump({"message": {"message": message, "extraInfo": info}}, stream)


def torchrun_env() -> dict[str, int] | None:
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE as ints; None in a plain process or WORLD_SIZE 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    missing = [name for name in _ENV[:2] if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {missing} are not: start the processes with torchrun")
    env = {name: int(os.environ[name]) for name in _ENV if name in os.environ}
    env.setdefault("LOCAL_RANK", env["RANK"])
    env.setdefault("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])
    return env


@dataclass(frozen=True, kw_only=True)
class World:
    """Where this process stands: rank in [0, size), its machine-local rank, the device it computes on, and the
    backend of the process group (None: one process, no group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: str | None = None  # None: whatever the caller chose (one process)
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, shows progress and writes the final files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self, where: Any = "cpu") -> dict[str, Any]:
        """What a run's outputs record about how it ran: {"world_size": N, "device": "cpu" | "cuda" | ...}.
        `where`: a device, a device name, or a model (its parameters' device; "cpu" for one without parameters)."""
        if hasattr(where, "parameters"):
            where = next((p.device for p in where.parameters()), "cpu")
        kind = where if isinstance(where, str) else getattr(where, "type", "cpu")  # a torch.device has .type
        return {"world_size": self.size, "device": (self.device or kind).split(":")[0]}

    def share(self, n: int, unit: int = 1) -> range:
        """This rank's items of range(n): contiguous, disjoint across ranks, deterministic, made of whole units
        (batches) of `unit` items as a one-process run would form them; ranks in order cover range(n) in order.
        The first ranks take one unit more when the units do not divide evenly; a rank may get none."""
        return share_range(n, rank=self.rank, size=self.size, unit=unit)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            with _collective("a barrier"):
                dist.barrier(group=_object_group)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` (picklable), in rank order, on rank 0; None on the other ranks."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        received = [None] * self.size if self.is_main else None
        with _collective("a gather"):
            dist.gather_object(obj, received, dst=0, group=_object_group)
        return received

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (small objects only: each rank receives all)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        received: list[Any] = [None] * self.size
        with _collective("a gather"):
            dist.all_gather_object(received, obj, group=_object_group)
        return received

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the others pass anything, e.g. None)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        with _collective("a broadcast"):
            dist.broadcast_object_list(box, src=0, group=_object_group)
        return box[0]

    def sum_(self, tensor: Any) -> Any:
        """Sum `tensor` over the ranks, in place (on the main backend: NCCL tensors stay on the GPU); returns it."""
        if self.distributed:
            import torch.distributed as dist

            with _collective("a gradient all-reduce"):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, parameters: Sequence[Any], extra: Any) -> Any:
        """Sum the gradients of `parameters` and the vector `extra` [K] over the ranks, in one all-reduce on the
        main backend. A parameter without a gradient counts as zeros; it keeps no gradient only where no rank had
        one (as a parameter outside the loss in one process). Returns the summed `extra`."""
        if not self.distributed:
            return extra
        import torch

        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1) for p in parameters]
        used = torch.tensor([p.grad is not None for p in parameters], dtype=extra.dtype, device=extra.device)
        flat = self.sum_(torch.cat([*grads, used, extra]))
        offset = 0
        for parameter, flag in zip(parameters, flat[-extra.numel() - len(parameters) : -extra.numel()], strict=True):
            size = parameter.numel()
            parameter.grad = flat[offset : offset + size].view_as(parameter).clone() if flag > 0 else None
            offset += size
        return flat[-extra.numel() :]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first, then the others (e.g. converting a dataset or writing an index once)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


LOCAL = World()


def share_range(n: int, *, rank: int, size: int, unit: int = 1) -> range:
    """Items of range(n) for `rank` of `size`, in whole units of `unit` items (see `World.share`)."""
    if n < 0 or unit < 1 or not 0 <= rank < size:
        raise ValueError(f"bad share: n={n}, unit={unit}, rank={rank}, size={size}")
    base, extra = divmod(-(-n // unit), size)  # units per rank; the first `extra` ranks take one more
    first = rank * base + min(rank, extra)
    last = first + base + (rank < extra)
    return range(min(first * unit, n), min(last * unit, n))


def threads_per_rank(local_size: int) -> int:
    """Threads per CPU rank: the cores this process may use, split evenly among the ranks of this machine.

    torchrun sets OMP_NUM_THREADS=1 for every rank unless it is already set; a value above 1 is therefore the
    user's choice and is kept.
    """
    requested = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    if requested > 1:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_size))


def init_from_env(device: str = "cpu", timeout_s: float = 1800.0) -> World:
    """Join torchrun's process group (see the module docstring); `LOCAL` outside torchrun.

    device: what the user asked for. "cuda" (any index) becomes `cuda:LOCAL_RANK` with NCCL; anything else stays
    as given, with Gloo. Raises ValueError when CUDA is asked for but this machine has too few GPUs.
    """
    env = torchrun_env()
    if env is None:
        return LOCAL
    import torch
    import torch.distributed as dist

    global _object_group
    rank, size, local_rank, local_size = (env[name] for name in _ENV)
    timeout = timedelta(seconds=timeout_s)
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(
                f"rank {rank} needs GPU {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                f"device(s): start at most that many processes per node (--nproc-per-node)"
            )
        if device not in ("cuda", f"cuda:{local_rank}"):
            logger.warning("--device %s under torchrun: rank %d uses cuda:%d, its local rank", device, rank, local_rank)
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
        dist.init_process_group(backend, timeout=timeout, device_id=torch.device(device))
        _object_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        backend = "gloo"
        torch.set_num_threads(threads_per_rank(local_size))
        dist.init_process_group(backend, timeout=timeout)
        _object_group = None  # the default group is Gloo already
    logger.debug("rank %d/%d (local %d/%d) on %s with %s", rank, size, local_rank, local_size, device, backend)
    return World(rank=rank, size=size, local_rank=local_rank, local_size=local_size, device=device, backend=backend)


def close(world: World, *, failed: bool = False, outlive_peers: bool = False) -> None:
    """Leave the process group: after a barrier when every rank succeeded, at once after a failure (the other
    ranks may be waiting in a collective; torchrun stops them when this rank exits non-zero).

    outlive_peers (rank 0 about to exit with a result's non-zero code, e.g. predict's 1): also wait until the
    other ranks on this machine have exited. torchrun sends SIGTERM to every rank still running once one exits
    non-zero, and reports them as failed: a rank still shutting down its interpreter would be one."""
    global _object_group
    if not world.distributed:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    peers = None
    if not failed:
        peers = world.gather((socket.gethostname(), os.getpid()))
        world.barrier()
    dist.destroy_process_group()
    _object_group = None
    if outlive_peers and peers:
        wait_for_exit([pid for host, pid in peers[1:] if host == socket.gethostname()])


def wait_for_exit(pids: Sequence[int], timeout: float = 30.0) -> None:
    """Wait until the processes `pids` have exited (zombies count as exited: their parent reaps them), at most
    `timeout` seconds. Reads /proc; where there is none (not Linux) it returns at once."""
    if not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + timeout
    waiting = list(pids)
    while waiting and time.monotonic() < deadline:
        waiting = [pid for pid in waiting if _running(pid)]
        if waiting:
            time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]  # the name in parentheses may hold spaces
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
