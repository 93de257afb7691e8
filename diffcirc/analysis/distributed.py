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
from datetime import timedelta

import pandas as pd
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
        if self.active and str(device) == "cuda":
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return str(device)

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

    def gather_frames(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Every rank's table, concatenated in rank order (empty shares dropped)."""
        parts = [f for f in self.all_gather(frame) if f is not None and len(f)]
        if not parts:
            return frame
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)

    def broadcast(self, obj):
        """Rank 0's obj, on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check(self, error: BaseException | None) -> None:
        """Raises on every rank if any rank failed (so no rank is left waiting in a collective)."""
        errors = [e for e in self.all_gather(None if error is None else (type(error).__name__, str(error)))
                  if e is not None]
        if error is not None:
            raise error
        if errors:
            name, message = errors[0]
            raise RuntimeError(f"another process of this run failed: {name}: {message}")

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["Ranks"]
