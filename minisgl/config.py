"""Server configuration: one frozen Struct, filled from flags whose defaults come from env vars.

`launch.py` builds it once and hands it to every child process as JSON (env var MINISGL_CONFIG), so
all processes agree on endpoints and limits without re-parsing anything.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    # model
    model_name: str | None = None
    model_local_dir: str | None = None
    revision: str | None = None  # of a Hub model (branch, tag or commit)
    model_path: str = ""  # resolved checkpoint directory (filled by launch.py)
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    # workers and engine
    workers: int = 1
    enable_multi_device: bool = False
    tp: int = 1  # tensor parallel: ranks (devices) per worker
    max_running: int = 64
    kv_cache_tokens: int = 0
    chunk_size: int = 512
    max_model_len: int = 0
    hf_concurrency: int = 16
    # scheduler
    scheduler_mode: str = "round_robin"
    max_inflight_total: int = 256
    max_inflight_per_engine: int = 64
    max_queue: int = 1024
    queue_timeout_s: float = 120.0
    adaptive_max_new_tokens: bool = True  # only once more work is in flight than the workers can run
    adaptive_floor: int = 32
    warm_prefixes: list[str] = []
    async_prefill_queue: bool = True
    zmq_control: bool = True
    zmq_control_endpoint: str = ""
    # gateway
    host: str = "127.0.0.1"
    port: int = 8000
    max_new_tokens_limit: int = 4096  # absurd above this
    default_max_new_tokens: int = 128
    max_body_bytes: int = 4 * 1024 * 1024  # HTTP bodies above this get a 413 before they are read whole
    max_prompt_chars: int = 262_144  # prompt / messages / control prefixes: checked before tokenizing
    api_key: str = ""  # when set, every route but /health and the page assets needs "Bearer <key>"
    allowed_origins: list[str] = []  # browser Origins allowed besides the server's own ("*": any)
    allowed_hosts: list[str] = []  # Host header values allowed besides the bound host ("*": any)
    drain_grace_s: float = 10.0  # SIGTERM: in-flight streams get this long to finish, then an error event
    # process tree
    runtime_dir: str = ""
    narrate: bool = False
    log_level: str = "INFO"
    served_model_name: str = ""
    # fields the user set (flag or env var); device-sized defaults never override these
    explicit: list[str] = []

    def run_capacity(self) -> int:
        """Requests the workers can run at once (beyond it, work waits): adaptive max_new_tokens
        engages only past this."""
        per_worker = self.hf_concurrency if self.backend == "hf" else self.max_running
        return max(1, min(self.max_inflight_total, self.workers * per_worker))

    def endpoint(self, name: str) -> str:
        """ipc:// endpoint of a process's PULL socket inside the private runtime directory."""
        return f"ipc://{os.path.join(self.runtime_dir, name + '.sock')}"

    @property
    def control_endpoint(self) -> str:
        return self.zmq_control_endpoint or self.endpoint("control")

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @staticmethod
    def from_json(data: str | bytes) -> "ServerConfig":
        return msgspec.json.decode(data, type=ServerConfig)

    @staticmethod
    def from_env_var() -> "ServerConfig":
        return ServerConfig.from_json(os.environ["MINISGL_CONFIG"])


def context_window(cfg: ServerConfig) -> int:
    """Prompt + completion tokens of one request at most: MAX_MODEL_LEN, else the model's own."""
    if cfg.max_model_len > 0:
        return cfg.max_model_len
    import json

    model_cfg = json.loads((Path(cfg.model_path) / "config.json").read_text())
    return int(model_cfg.get("max_position_embeddings", 4096))


def switched_off(value: str) -> bool:
    """A setting that defaults to on (a backend option, MINISGL_CPU_KERNELS) set to 0/false/no/off."""
    return value.strip().lower() in ("0", "false", "no", "off")


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _split_prefixes(value: str, sep: str = "||") -> list[str]:
    """WARM_PREFIXES: a JSON list of strings, or strings separated by '||' (origins and hosts: ',')."""
    value = value.strip()
    if not value:
        return []
    if value.startswith("["):
        return msgspec.json.decode(value, type=list[str])
    return [p.strip() if sep == "," else p for p in value.split(sep) if p.strip()]


@dataclass(frozen=True)
class _Flag:
    env: str
    field: str
    kind: type
    help: str
    sep: str = "||"  # list flags: separator when the value is not a JSON list


# flag name -> (env var, config field, type, help). The env var gives the default; the flag wins.
FLAGS: dict[str, _Flag] = {
    "--model-name": _Flag("MODEL_NAME", "model_name", str, "model to serve (default: embedded SmolLM2-135M-Instruct)"),
    "--model-local-dir": _Flag("MODEL_LOCAL_DIR", "model_local_dir", str, "local Hugging Face checkpoint directory (wins over --model-name)"),
    "--revision": _Flag("MODEL_REVISION", "revision", str, "Hub revision of MODEL_NAME: branch, tag or commit (default main)"),
    "--load-format": _Flag("LOAD_FORMAT", "load_format", str, "auto | safetensors | gguf | dummy (random weights from config.json)"),
    "--dtype": _Flag("DTYPE", "dtype", str, "auto | float32 | bfloat16 | float16"),
    "--device": _Flag("DEVICE", "device", str, "auto | cpu | cuda | mps"),
    "--backend": _Flag("BACKEND_IMPL", "backend", str, "auto | torch | sgl | mlx | hf (auto: sgl on CUDA, mlx on MPS with MLX, else torch)"),
    "--workers": _Flag("WORKERS", "workers", int, "number of worker processes (one per device on GPUs)"),
    "--enable-multi-device": _Flag("ENABLE_MULTI_DEVICE", "enable_multi_device", bool, "one worker per visible CUDA device"),
    "--tp": _Flag("TP_SIZE", "tp", int, "tensor parallelism: split each worker's model over this many devices "
                  "(ranks); --workers groups of --tp devices"),
    "--max-running": _Flag("MAX_RUNNING", "max_running", int, "requests decoded together per worker"),
    "--kv-cache-tokens": _Flag("KV_CACHE_TOKENS", "kv_cache_tokens", int, "KV pool size in tokens per worker (0: from memory)"),
    "--chunk-size": _Flag("CHUNK_SIZE", "chunk_size", int, "prefill tokens per engine step (chunked prefill)"),
    "--max-model-len": _Flag("MAX_MODEL_LEN", "max_model_len", int, "context window (0: the model's)"),
    "--hf-concurrency": _Flag("HF_CONCURRENCY", "hf_concurrency", int, "hf backend: generate() calls at once"),
    "--scheduler-mode": _Flag("SCHEDULER_MODE", "scheduler_mode", str, "round_robin | fcfs | random | cache_aware"),
    "--max-inflight-total": _Flag("MAX_INFLIGHT_TOTAL", "max_inflight_total", int, "requests dispatched to all workers at most"),
    "--max-inflight-per-engine": _Flag("MAX_INFLIGHT_PER_ENGINE", "max_inflight_per_engine", int, "requests dispatched to one worker at most"),
    "--max-queue": _Flag("MAX_QUEUE", "max_queue", int, "requests waiting in the scheduler at most; beyond it: HTTP 429"),
    "--queue-timeout-s": _Flag("QUEUE_TIMEOUT_S", "queue_timeout_s", float, "seconds a request may wait in the queue before a 503"),
    "--adaptive-max-new-tokens": _Flag("ADAPTIVE_MAX_NEW_TOKENS", "adaptive_max_new_tokens", bool, "scale max_new_tokens down under load"),
    "--warm-prefixes": _Flag("WARM_PREFIXES", "warm_prefixes", list, "prefixes prefilled into every worker before ready (JSON list or 'a||b')"),
    "--async-prefill-queue": _Flag("ASYNC_PREFILL_QUEUE", "async_prefill_queue", bool, "run warm-ups at low priority while serving"),
    "--zmq-control": _Flag("ZMQ_CONTROL", "zmq_control", bool, "serve the ZMQ control channel"),
    "--zmq-control-endpoint": _Flag("ZMQ_CONTROL_ENDPOINT", "zmq_control_endpoint", str, "control endpoint (default: ipc in the runtime dir)"),
    "--host": _Flag("HOST", "host", str, "HTTP host"),
    "--port": _Flag("PORT", "port", int, "HTTP port"),
    "--max-body-bytes": _Flag("MAX_BODY_BYTES", "max_body_bytes", int, "largest HTTP request body; beyond it: HTTP 413"),
    "--max-prompt-chars": _Flag("MAX_PROMPT_CHARS", "max_prompt_chars", int, "largest prompt (all message contents together) in characters, checked before tokenizing"),
    "--api-key": _Flag("API_KEY", "api_key", str, "require 'Authorization: Bearer KEY' on every route but /health and the page assets"),
    "--allowed-origins": _Flag("ALLOWED_ORIGINS", "allowed_origins", list, "browser Origins allowed besides the server's own, comma-separated ('*': any)", ","),
    "--allowed-hosts": _Flag("ALLOWED_HOSTS", "allowed_hosts", list, "Host header values allowed besides the bound host, comma-separated ('*': any)", ","),
    "--drain-grace-s": _Flag("DRAIN_GRACE_S", "drain_grace_s", float, "on SIGTERM, seconds in-flight streams may take to finish before they end with an error event"),
    "--narrate": _Flag("NARRATE", "narrate", bool, "log each prefill, decode step and streamed chunk in plain words"),
    "--log-level": _Flag("LOG_LEVEL", "log_level", str, "DEBUG | INFO | WARNING"),
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    for flag, spec in FLAGS.items():
        default = getattr(defaults, spec.field)
        shown = default if default not in (None, "", []) else "-"
        help_text = f"{spec.help} [env {spec.env}, default {shown}]"
        if spec.kind is bool:
            parser.add_argument(flag, dest=spec.field, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        elif spec.kind is list:
            parser.add_argument(flag, dest=spec.field, default=None, help=help_text,
                                type=lambda v, sep=spec.sep: _split_prefixes(v, sep))
        else:
            parser.add_argument(flag, dest=spec.field, default=None, type=spec.kind, help=help_text)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Flag if given, else env var if set, else the ServerConfig default."""
    values: dict[str, object] = {}
    for spec in FLAGS.values():
        value = getattr(args, spec.field, None)
        if value is None and os.environ.get(spec.env, "") != "":
            raw = os.environ[spec.env]
            if spec.kind is bool:
                value = _env_bool(spec.env, False)
            elif spec.kind is list:
                value = _split_prefixes(raw, spec.sep)
            else:
                value = spec.kind(raw)
        if value is not None:
            values[spec.field] = value
    if values.get("scheduler_mode") == "fsfs":  # the seed's spelling
        values["scheduler_mode"] = "fcfs"
    return ServerConfig(**values, explicit=sorted(values))


# Sizes for a CUDA worker running the sgl backend. The CPU's ServerConfig defaults (64 running, caps
# 256/64, 512-token chunks) are sized for a few cores; a GPU runs a decode step of hundreds of
# sequences in about the time of one, and a prompt chunk of thousands of tokens in one pass.
GPU_MAX_RUNNING = 512  # decode batch per worker (CUDA graphs are captured up to it)
GPU_CHUNK_SIZE = 8192  # prefill tokens per step: the paged extend kernel takes every chunk in one launch


def device_sized(cfg: ServerConfig) -> tuple[ServerConfig, dict[str, int]]:
    """The config with the sgl backend's device-sized defaults filled in wherever the user set nothing
    (env vars and flags still win), and what was chosen, for the start-up log. The KV pool is sized by
    the worker itself, from its device's free memory after the weights (backends/sgl.py)."""
    if cfg.backend != "sgl":
        return cfg, {}
    chosen: dict[str, int] = {}
    explicit = set(cfg.explicit)

    def pick(name: str, value: int) -> int:
        if name in explicit:
            return getattr(cfg, name)
        chosen[name] = value
        return value

    max_running = pick("max_running", GPU_MAX_RUNNING)
    # a worker holds twice what it runs, so a finished request's row is refilled without a round trip
    per_engine = pick("max_inflight_per_engine", 2 * max_running)
    pick("max_inflight_total", cfg.workers * per_engine)
    pick("chunk_size", GPU_CHUNK_SIZE)
    return msgspec.structs.replace(cfg, **chosen), chosen
