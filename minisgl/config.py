"""Server configuration: one frozen Struct, filled from flags whose defaults come from env vars.

The launcher (minisgl/launcher.py) builds it once and hands it to every child process as JSON (env var
MINISGL_CONFIG), so all processes agree on endpoints and limits without re-parsing anything. The layers
below derive from it rather than copy it: BackendConfig (a worker's view, here) and EngineConfig
(minisgl/engine/config.py, with the model's shape and the KV pool size added at load).
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from dataclasses import dataclass
from typing import Annotated

import msgspec

from minisgl.backend_registry import backend_spec


def flag(help: str, env: str = "", sep: str = "") -> msgspec.Meta:
    """A ServerConfig field that is also a launch flag (see _flags): its help, and its env var where that
    is not the field's name in capitals."""
    extra = {k: v for k, v in (("env", env), ("sep", sep)) if v}
    return msgspec.Meta(description=help, extra=extra)


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    # model
    model_name: Annotated[str | None, flag(
        "model to serve (default: embedded SmolLM2-135M-Instruct)")] = None
    model_local_dir: Annotated[str | None, flag(
        "local Hugging Face checkpoint directory (wins over --model-name)")] = None
    revision: Annotated[str | None, flag(
        "Hub revision of MODEL_NAME: branch, tag or commit (default main)", env="MODEL_REVISION")] = None
    model_path: str = ""  # resolved checkpoint directory (filled by the launcher)
    load_format: Annotated[str, flag(
        "auto | safetensors | gguf | dummy (random weights from config.json)")] = "auto"
    dtype: Annotated[str, flag("auto | float32 | bfloat16 | float16")] = "auto"
    device: Annotated[str, flag("auto | cpu | cuda | mps")] = "auto"
    backend: Annotated[str, flag("auto, or one of the backends", env="BACKEND_IMPL")] = "auto"
    # workers and engine
    workers: Annotated[int, flag("number of worker processes (one per device on GPUs)")] = 1
    enable_multi_device: Annotated[bool, flag("one worker per visible CUDA device")] = False
    tp: Annotated[int, flag("tensor parallelism: split each worker's model over this many devices (ranks); "
                        "--workers groups of --tp devices", env="TP_SIZE")] = 1
    max_running: Annotated[int, flag("requests decoded together per worker")] = 64
    kv_cache_tokens: Annotated[int, flag("KV pool size in tokens per worker (0: from memory)")] = 0
    chunk_size: Annotated[int, flag("prefill tokens per engine step (chunked prefill)")] = 512
    max_model_len: Annotated[int, flag("context window (0: the model's)")] = 0
    hf_concurrency: Annotated[int, flag("hf backend: generate() calls at once")] = 16
    # scheduler
    scheduler_mode: Annotated[str, flag("round_robin | fcfs | random | cache_aware")] = "round_robin"
    max_inflight_total: Annotated[int, flag("requests dispatched to all workers at most")] = 256
    max_inflight_per_engine: Annotated[int, flag("requests dispatched to one worker at most")] = 64
    max_queue: Annotated[int, flag(
        "requests waiting in the scheduler at most; beyond it: HTTP 429")] = 1024
    queue_timeout_s: Annotated[float, flag("seconds a request may wait in the queue before a 503")] = 120.0
    # only once more work is in flight than the workers can run
    adaptive_max_new_tokens: Annotated[bool, flag("scale max_new_tokens down under load")] = True
    adaptive_floor: int = 32
    warm_prefixes: Annotated[list[str], flag(
        "prefixes prefilled into every worker before ready (JSON list or 'a||b')")] = []
    async_prefill_queue: Annotated[bool, flag("run warm-ups at low priority while serving")] = True
    zmq_control: Annotated[bool, flag("serve the ZMQ control channel")] = True
    zmq_control_endpoint: Annotated[str, flag("control endpoint (default: ipc in the runtime dir)")] = ""
    # gateway
    host: Annotated[str, flag("HTTP host")] = "127.0.0.1"
    port: Annotated[int, flag("HTTP port")] = 8000
    max_new_tokens_limit: int = 4096  # absurd above this
    default_max_new_tokens: int = 128
    max_body_bytes: Annotated[int, flag("largest HTTP request body; beyond it: HTTP 413")] = 4 * 1024 * 1024
    max_prompt_chars: Annotated[int, flag(
        "largest prompt (all message contents together) in characters, checked before tokenizing")] = 262_144
    api_key: Annotated[str, flag(
        "require 'Authorization: Bearer KEY' on every route but /health and the page assets")] = ""
    allowed_origins: Annotated[list[str], flag(
        "browser Origins allowed besides the server's own, comma-separated ('*': any)", sep=",")] = []
    allowed_hosts: Annotated[list[str], flag(
        "Host header values allowed besides the bound host, comma-separated ('*': any)", sep=",")] = []
    drain_grace_s: Annotated[float, flag(
        "on SIGTERM, seconds in-flight streams may take to finish before they end with an error event")] = 10.0
    # process tree
    runtime_dir: str = ""
    narrate: Annotated[bool, flag("log each prefill, decode step and streamed chunk in plain words")] = False
    log_level: Annotated[str, flag("DEBUG | INFO | WARNING")] = "INFO"
    served_model_name: str = ""
    # fields the user set (flag or env var); device-sized defaults never override these
    explicit: list[str] = []

    def run_capacity(self) -> int:
        """Requests the workers can run at once (beyond it, work waits): adaptive max_new_tokens
        engages only past this."""
        per_worker = getattr(self, backend_spec(self.backend).concurrency_field)
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
    from minisgl.assets.checkpoint import context_length

    return context_length(cfg.model_path, cfg.max_model_len)


class BackendConfig(ServerConfig, frozen=True, kw_only=True):
    """A worker's view: the server's settings plus what only a backend needs. `device` is the worker's
    own device (cuda:1, ...), never auto: the worker picks it (auto in-process: cuda when torch sees one,
    else cpu). The engine's config derives from this one (minisgl/engine/config.py)."""

    kv_memory_fraction: float = 0.3  # of free device (or host) memory, when kv_cache_tokens is 0
    seed: int = 0
    extra: dict[str, str] = {}  # backend options by name (the sgl backend's A/B switches, cpu_isa, ...)

    def __post_init__(self) -> None:
        if self.device == "auto":
            import torch

            msgspec.structs.force_setattr(self, "device", "cuda" if torch.cuda.is_available() else "cpu")

    @classmethod
    def for_worker(cls, cfg: ServerConfig, device: str) -> "BackendConfig":
        return cls(**{**msgspec.structs.asdict(cfg), "device": device})


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
    kind: type  # str, int, float, bool or list
    help: str
    sep: str = "||"  # list flags: separator when the value is not a JSON list


def _flags() -> dict[str, _Flag]:
    """flag name -> _Flag, read off ServerConfig's annotated fields (the flag is the field's name with
    dashes, the env var its name in capitals unless the field says otherwise)."""
    out: dict[str, _Flag] = {}
    for name, hint in typing.get_type_hints(ServerConfig, include_extras=True).items():
        if typing.get_origin(hint) is not Annotated:
            continue
        base, meta = typing.get_args(hint)[:2]
        spec = meta.extra
        if typing.get_origin(base) in (typing.Union, types.UnionType):  # str | None: a str flag
            base = next(k for k in typing.get_args(base) if k is not type(None))
        kind = typing.get_origin(base) or base  # list[str]: a list flag
        out["--" + name.replace("_", "-")] = _Flag(spec.get("env") or name.upper(), name, kind, meta.description,
                                                   spec.get("sep", "||"))
    return out


FLAGS: dict[str, _Flag] = _flags()


def add_config_flags(parser: argparse.ArgumentParser, help_extra: dict[str, str] | None = None) -> None:
    """One flag per annotated ServerConfig field; help_extra adds to a field's help (the launcher names
    the backends from their registry, which this module must not import)."""
    defaults = ServerConfig()
    for flag_name, spec in FLAGS.items():
        default = getattr(defaults, spec.field)
        shown = default if default not in (None, "", []) else "-"
        extra = (help_extra or {}).get(spec.field)
        help_text = f"{spec.help}{'; ' + extra if extra else ''} [env {spec.env}, default {shown}]"
        if spec.kind is bool:
            parser.add_argument(flag_name, dest=spec.field, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        elif spec.kind is list:
            parser.add_argument(flag_name, dest=spec.field, default=None, help=help_text,
                                type=lambda v, sep=spec.sep: _split_prefixes(v, sep))
        else:
            parser.add_argument(flag_name, dest=spec.field, default=None, type=spec.kind, help=help_text)


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
    the worker itself, from its device's free memory after the weights (backends/sgl_backend.py)."""
    if not backend_spec(cfg.backend).gpu_sized:
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
