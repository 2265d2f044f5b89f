"""The paged KV pool: every layer's keys and values for every cached token, preallocated once.

A page is one token (as in SGLang), so a "slot" is the row of one token in every layer's buffers:
`k[layer][slot]` is that token's keys, shape [n_kv_heads, head_dim]. Requests and the radix cache hold
slot ids; the allocator hands them out and takes them back. Slot 0 is never handed out: padded
positions of batched gathers point at it, so they always read valid (and ignored) memory.

    pool = KVPool(num_layers, n_kv_heads, head_dim, num_tokens, dtype, device)
    slots = pool.alloc(n)     # int64 tensor of n slot ids on the pool's device, or None when short
    pool.free(slots)
    pool.free_count, pool.total

`tokens_for_memory` sizes a pool from a fraction of the free device (or host) memory.
"""

from __future__ import annotations

import os

import torch


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_tokens: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if num_tokens < 1:
            raise ValueError("the KV pool needs at least one token")
        self.total = num_tokens
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (num_layers, num_tokens + 1, num_kv_heads, head_dim)  # +1: the scratch slot 0
        # empty, not zeros: host pages are only committed once used. Every slot is written before it
        # is read, except slot 0, which padded gathers read: it must hold finite values.
        self.k = torch.empty(shape, dtype=dtype, device=self.device)
        self.v = torch.empty(shape, dtype=dtype, device=self.device)
        self.k[:, 0].zero_()
        self.v[:, 0].zero_()
        self._free = torch.arange(1, num_tokens + 1, dtype=torch.int64, device=self.device)

    @property
    def free_count(self) -> int:
        return self._free.numel()

    @property
    def used_count(self) -> int:
        return self.total - self._free.numel()

    def alloc(self, n: int) -> torch.Tensor | None:
        if n > self._free.numel():
            return None
        slots, self._free = self._free[:n], self._free[n:]
        return slots

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat([self._free, slots.to(self.device, torch.int64)])

    def reset(self) -> None:
        self._free = torch.arange(1, self.total + 1, dtype=torch.int64, device=self.device)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory where the pool would live: the GPU's free memory, else the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:  # Linux: MemAvailable counts reclaimable page cache, unlike SC_AVPHYS_PAGES
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def tokens_for_memory(fraction: float, bytes_per_token: int, device: torch.device | str) -> int:
    return int(free_memory_bytes(device) * fraction) // bytes_per_token
