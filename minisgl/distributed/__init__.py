"""Tensor parallelism: one worker's model split over N ranks (processes) with torch.distributed.

The scheduler sees a TP worker as ONE worker. Its N ranks are N processes (`procs/worker.py
--tp-rank r`), one per device: rank 0 owns the worker's sockets; every rank holds 1/N of the weights
and of the KV pool, and every rank runs the same engine (scheduling, radix cache, sampling) on the
same inputs, so they take the same decisions without being told each one:

  - `group.py`: process groups. The model's collectives go over a NCCL group on CUDA (gloo on CPU);
    a separate gloo group on the host carries the step broadcast and start-up agreements.
  - `layers.py`: the parallel layers. Column-parallel q/k/v and gate/up need no communication (they
    are our MergedLinear with 1/N of the rows); row-parallel o_proj and down_proj end in ONE
    all-reduce each; the embedding is vocabulary-parallel (one all-reduce); the logits are computed on
    each rank's vocabulary slice and ALL-GATHERED (one all-gather of [T, V/N] per step, T = rows that
    need logits), so every rank holds the full, bitwise-identical logits and samples the same tokens.
    Per forward: 2 * num_layers + 1 all-reduces and 1 all-gather on the model group.
  - `minisgl/models/sharding.py` (with the other model loading): which slice of each checkpoint tensor
    a rank keeps, the start-up shape checks (heads, KV heads, vocab, intermediate size divisible by N),
    `load_sharded_model` (used by `models.loader.load_model` when a TP group is active: one full tensor
    in memory at a time) and `shard_model` (split an already-built model, for checks).
  - `minisgl/backends/tp_sync.py` (it drives a backend): rank 0 broadcasts, each loop iteration, the scheduler messages it received (as
    the msgspec bytes they arrived in: nothing is pickled) plus a fingerprint of its engine state;
    the other ranks apply the same messages and step when rank 0 steps. A rank whose state differs
    from rank 0's stops with an error instead of deadlocking in a collective.
  - `minisgl/backends/tp_checks.py`: the launcher's start-up checks (devices, divisibility, NCCL,
    backend).

This package holds only what the model code itself needs (groups, parallel layers), so models/ can
import it without an import running back up.

CUDA graphs: `torch.distributed.all_reduce` / `all_gather_into_tensor` on a NCCL process group are
capturable (ProcessGroupNCCL launches them on the capturing stream's dependency chain), so the sgl
backend's decode graphs contain the collectives; the communicator is initialised eagerly (`device_id`)
and warmed by the eager forward that precedes each capture.
"""

from minisgl.distributed.group import TPGroup, get_tp, init_tp, tp_world

__all__ = ["TPGroup", "get_tp", "init_tp", "tp_world"]
