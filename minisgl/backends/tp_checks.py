"""Start-up checks for --tp, run by the launcher before any process starts (each problem: one clear
line), and the device each rank of each worker uses."""

from __future__ import annotations

from pathlib import Path

from minisgl.backend_registry import BACKENDS


def device_type(device: str) -> str:
    """cuda | mps | cpu for a DEVICE setting ("auto" asks torch, as the worker will)."""
    if device not in ("", "auto"):
        return device.split(":")[0]
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def rank_device(device: str, tp: int, worker_id: int, rank: int, cuda_count: int) -> str:
    """The device of rank `rank` of worker `worker_id`: worker w owns CUDA devices [w*tp, (w+1)*tp).
    A pure function of its arguments, so a restarted worker (or TP group) comes back on the same ones."""
    kind = device_type(device)
    if kind != "cuda":
        return device if device not in ("", "auto") else kind
    if ":" in device and tp == 1:
        return device  # an explicit cuda:N for the one worker
    index = worker_id * tp + rank
    return f"cuda:{index % cuda_count if tp == 1 and cuda_count else index}"  # TP=1: workers may share GPUs


def check_tp_request(tp: int, workers: int, backend: str, device: str, model_dir: Path | None) -> None:
    """Raise ValueError/RuntimeError naming the setting at fault."""
    if tp < 1:
        raise ValueError(f"TP_SIZE must be at least 1, not {tp}")
    if tp == 1:
        return
    engines = [name for name, spec in BACKENDS.items() if spec.engine]  # the others have no sharded model
    if backend not in engines:
        raise ValueError(f"TP_SIZE={tp} needs BACKEND_IMPL {' or '.join(engines)} (our engine); the {backend} backend "
                         "cannot split a model over devices")
    import torch
    import torch.distributed as dist

    kind = device_type(device)
    if kind == "mps":
        raise ValueError("TP_SIZE > 1 is not supported on MPS (one device, no collective backend)")
    if kind == "cuda":
        if ":" in device:
            raise ValueError(f"DEVICE={device} names one GPU; with TP_SIZE={tp} use DEVICE=cuda (worker w takes "
                             f"GPUs w*{tp}..w*{tp}+{tp - 1})")
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if workers * tp > visible:
            raise ValueError(f"{workers} worker(s) x TP_SIZE={tp} needs {workers * tp} CUDA devices, but {visible} "
                             "are visible (CUDA_VISIBLE_DEVICES, or fewer --workers / a smaller --tp)")
        if not dist.is_nccl_available():
            raise RuntimeError(f"TP_SIZE={tp} on CUDA needs NCCL, and this torch {torch.__version__} was built "
                               "without it (torch.distributed.is_nccl_available() is False)")
    if not dist.is_available() or not dist.is_gloo_available():
        raise RuntimeError(f"TP_SIZE={tp} needs torch.distributed with gloo, missing from torch {torch.__version__}")
    if model_dir is not None and (model_dir / "config.json").exists():
        from minisgl.models.sharding import check_tp_shape
        from minisgl.models.weights import load_config

        check_tp_shape(load_config(model_dir), tp, model_dir.name)
