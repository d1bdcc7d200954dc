"""How the processes of a run talk: world, rank, main-process guard, gather / sum / broadcast.

`Comm()` is a world of one process: every collective returns its input, nothing is imported.
`TorchComm()` runs the same calls over torch.distributed (an initialised process group).
The trainer only ever asks its comm; it never checks which one it holds.
"""

from __future__ import annotations

import os

import torch


class Comm:
    """One process: rank 0 of a world of 1; every collective is the identity."""

    world = 1
    rank = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this process's contiguous share of n items (shares differ by at most one)."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def share(self, items: list) -> list:
        """This process's contiguous share of `items` (their number must split evenly)."""
        b = len(items) // self.world
        return items[self.rank * b:(self.rank + 1) * b]

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Equal-shaped tensors of all processes concatenated along dim 0 in rank order (on CPU)."""
        return t.detach().cpu()

    def gather_objects(self, obj) -> list:
        return [obj]

    def sum(self, values: list) -> list:
        return list(values)

    def broadcast(self, obj, src: int = 0):
        return obj

    def barrier(self) -> None:
        pass

    def weighted_mean(self, count: int, metrics: dict) -> dict:
        """Means computed over `count` items on each process -> the means over all items."""
        if self.world == 1:
            return metrics
        parts = [(c, m) for c, m in self.gather_objects((count, metrics)) if c and m]
        total = sum(c for c, _ in parts)
        if not total:
            return {}
        return {k: sum(c * m[k] for c, m in parts) / total for k in parts[0][1]}


class TorchComm(Comm):
    """The processes of an initialised torch.distributed process group."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.world, self.rank = dist.get_world_size(), dist.get_rank()

    def _device(self):
        if self.dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def gather_rows(self, t):
        x = t.detach().to(self._device())
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.dist.all_gather(parts, x)
        return torch.cat(parts).cpu()

    def gather_objects(self, obj) -> list:
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list) -> list:
        x = torch.tensor(values, dtype=torch.float64, device=self._device())
        self.dist.all_reduce(x)
        return x.cpu().tolist()

    def broadcast(self, obj, src: int = 0):
        box = [obj]
        self.dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        self.dist.barrier()


def is_main_process() -> bool:
    """Rank 0 of the run, or a run of one process (before or after the process group exists)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def shutdown(synchronize: bool = False) -> None:
    """Tear the process group down explicitly: a ZeRO-3 process that exits with it alive aborts.
    After a run that finished everywhere (`synchronize`), a barrier first: a process that tears gloo
    down while its peer still finishes its last collective can abort the peer at exit ("terminate
    called without an active exception"). No barrier after an error: the others may sit in another
    collective, and this process must exit (the launcher then stops the rest) rather than wait."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
