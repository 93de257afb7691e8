"""The processes of one analysis run: one, or several launched by ``torchrun``.

    torchrun --nproc_per_node=4 -m diffcirc analyze --out runs/big ...

``Ranks.from_env`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...)
and joins the process group: gloo for CPU tensors, NCCL as well when the run is on CUDA devices
(each process then takes the GPU of its LOCAL_RANK). Without torchrun it is a single process and
every collective below is the identity, so the driver has one code path.

Work is split by ``shard`` (every world-th item, starting at the rank); results come back by
``all_gather`` (lists and tables, in rank order) and ``Recorder.all_reduce`` (streaming
aggregates). Every rank ends a phase with the full tables, so later phases can read them; only
rank 0 touches the output folder.
"""

from __future__ import annotations

import os
import pickle
from datetime import timedelta

import torch
import torch.distributed as dist

# A phase may keep one rank busy long after another finished its share (uneven shards, rank 0
# writing tables): wait hours, not the default 30 minutes, before calling a peer lost.
TIMEOUT = timedelta(hours=6)


class Ranks:
    """rank, world size and the collectives the driver needs."""

    def __init__(self, rank: int = 0, world: int = 1, owns_group: bool = False):
        self.rank, self.world, self._owns_group = int(rank), int(world), owns_group

    @classmethod
    def from_env(cls, device: str = "cpu") -> "Ranks":
        """One process, or this process's place among torchrun's (joins the group if needed)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        backend = "gloo"
        if str(device).startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), owns_group=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, device: str) -> str:
        """'cuda' means this rank's own GPU (LOCAL_RANK) when several processes share a node."""
        device = str(device)
        if self.active and device.startswith("cuda"):
            if device != "cuda":
                raise ValueError(f"--device {device} under torchrun would put every process on one GPU; "
                                 "use --device cuda: each process takes the GPU of its LOCAL_RANK")
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return device

    @property
    def per_host(self) -> int:
        """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE), which share its memory."""
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if self.active else 1

    def shard(self, items) -> list:
        """This rank's share of items: items[rank::world]."""
        return list(items)[self.rank::self.world]

    def all_gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] for one process)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_rows(self, rows: list) -> list:
        """Every rank's rows, concatenated in rank order."""
        return [row for part in self.all_gather(rows) for row in part]

    def broadcast(self, obj):
        """Rank 0's obj, on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check(self, error: BaseException | None) -> None:
        """Raises on every rank if any rank failed (so no rank is left waiting in a collective):
        the failing rank's own exception, on the others the first failure (same type and message,
        so the CLI reports it the same way on every rank)."""
        if not self.active:
            if error is not None:
                raise error
            return
        travelling = error
        if error is not None:
            try:
                pickle.loads(pickle.dumps(error))
            except Exception:  # an exception that does not pickle travels as its text
                travelling = RuntimeError(f"{type(error).__name__}: {error}")
        shared = self.all_gather(travelling)
        if error is not None:
            raise error
        for e in shared:
            if e is not None:
                raise e

    def on_main(self, fn):
        """fn() on rank 0 alone (its result there, None elsewhere); an exception it raises is raised
        on every rank instead of leaving the others waiting in the next collective."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:
                error = e
        self.check(error)
        return result

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["Ranks"]
