"""The TP process groups of one worker, and the two collectives the model needs.

One `TPGroup` per process, set once by `init_tp` (before the backend loads the model, which is how
`models.loader.load_model` knows to load a shard). Rendezvous is a FileStore in the server's private
runtime directory (mode 0700): no listening port for anyone on the host to reach, and a fresh file per
(re)start of the group, so a crashed group's keys never leak into the next one.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("minisgl.tp")

_TP: TPGroup | None = None


@dataclass
class TPGroup:
    rank: int
    world: int
    backend: str  # of the model group: "nccl" on CUDA, "gloo" on CPU
    group: dist.ProcessGroup  # the model's collectives (all-reduce, all-gather)
    cpu_group: dist.ProcessGroup  # gloo, host tensors: step broadcast, start-up agreements

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place. gloo on a CUDA tensor (several gloo ranks sharing one GPU, as in
        bench/tp_check.py) goes through a host copy."""
        if self.backend == "gloo" and t.device.type != "cpu":
            host = t.cpu()
            dist.all_reduce(host, group=self.group)
            t.copy_(host)
        else:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """[T, n] on each rank -> [T, world * n], rank r's columns at r * n (the vocab-parallel logits)."""
        t = t.contiguous()
        if self.backend == "nccl":
            out = t.new_empty((self.world * t.shape[0], t.shape[1]))
            dist.all_gather_into_tensor(out, t, group=self.group)
            return out.view(self.world, t.shape[0], t.shape[1]).permute(1, 0, 2).reshape(t.shape[0], -1)
        host = t.cpu()
        parts = [torch.empty_like(host) for _ in range(self.world)]
        dist.all_gather(parts, host, group=self.group)
        return torch.cat(parts, dim=-1).to(t.device)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (over the host group)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


def get_tp() -> TPGroup | None:
    return _TP


def tp_world() -> int:
    return 1 if _TP is None else _TP.world


def comm_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_tp(rank: int, world: int, store_path: str, device: torch.device | str,
            timeout_s: float = 600.0, backend: str | None = None) -> TPGroup:
    """Join the group of `world` ranks meeting at `store_path`; the model group is NCCL on CUDA, gloo
    elsewhere (or `backend`), the host group always gloo. Blocks until every rank has joined."""
    global _TP
    device = torch.device(device)
    backend = backend or comm_backend(device)
    if backend == "nccl" and not dist.is_nccl_available():
        raise RuntimeError(f"tensor parallelism on CUDA needs NCCL, and this torch {torch.__version__} "
                           "has no NCCL (torch.distributed.is_nccl_available() is False)")
    if not dist.is_gloo_available():
        raise RuntimeError(f"tensor parallelism needs torch.distributed's gloo backend, missing from torch "
                           f"{torch.__version__}")
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ \
            and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the ranks of one worker share a host
    store = dist.FileStore(store_path, world)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}  # eager NCCL init: ready before graph capture
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
    # Always a group of its own, also on CPU: the model's collectives are then the only ones on `group`.
    cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    _TP = TPGroup(rank, world, backend, dist.group.WORLD, cpu_group)
    dist.barrier(group=cpu_group)
    log.info("TP rank %d of %d on %s: model collectives over %s, step broadcast over gloo", rank, world,
             device, backend)
    return _TP


def destroy_tp() -> None:
    """An orderly end: every rank calls it after its last collective, then exit_rank. The groups are
    not destroyed: ncclCommDestroy can hang after a CUDA graph captured NCCL work (pytorch#115388), and
    the process ends right after without the interpreter's teardown anyway."""
    global _TP
    if _TP is not None and dist.is_initialized():
        dist.barrier(group=_TP.cpu_group)
    _TP = None


def exit_rank(code: int = 0) -> None:
    """End a TP rank's process: skip the interpreter's teardown, where gloo's threads (joinable
    std::threads in static objects) abort the process now and then, and NCCL's may hang."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
