"""MODEL_NAME=<org>/<repo>: a checkpoint from the Hugging Face Hub, downloaded once into its cache.

Everything goes through huggingface_hub, so its settings apply as usual: HF_TOKEN (gated or private
repos), HF_ENDPOINT (a mirror), HF_HOME / HF_HUB_CACHE (where the cache is), HF_HUB_OFFLINE=1 (use the
cache only, never the network). Order of work, so that nothing large moves before we know it can run:

  1. the repo's file list at the revision (one small API call): it must have config.json and
     safetensors weights;
  2. config.json alone: its architecture must be one our engine implements (else the error lists them);
  3. the snapshot, weights included, with huggingface_hub's progress bars; only the files a checkpoint
     needs (config, tokenizer, chat template, *.safetensors), not .bin / .gguf / .onnx copies.

A second start finds everything in the cache (offline too). Without a network and without a cached
copy, the error says how to point MODEL_LOCAL_DIR at a local folder instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# What a checkpoint needs; repos often also carry .bin / .gguf / .onnx / .msgpack copies of the weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]

LOCAL_HINT = ("To serve a checkpoint you already have, set MODEL_LOCAL_DIR to its folder (config.json, "
              "*.safetensors, tokenizer files); to use a copy already in the Hugging Face cache, set "
              "HF_HUB_OFFLINE=1.")


class HubError(RuntimeError):
    """The model could not be fetched; the message says why and what to do."""


def looks_like_repo_id(name: str) -> bool:
    parts = name.strip().split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def check_architecture(config: dict, repo: str, supported: list[str]) -> None:
    archs = config.get("architectures") or []
    if not any(a in supported for a in archs):
        raise HubError(f"{repo} is a {', '.join(archs) or 'model with no architectures in its config.json'}; "
                       f"mini-sglang's engine runs {', '.join(supported)}. Nothing was downloaded "
                       "beyond config.json. (BACKEND_IMPL=hf serves other architectures through transformers.)")


def fetch_from_hub(repo: str, revision: str | None = None, supported: list[str] | None = None) -> Path:
    """Local snapshot folder of repo at revision (default: main), downloading what is missing.
    supported: architectures to accept (None: any, e.g. for the hf backend)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub import constants as hf_constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{repo}" + (f" at revision {revision}" if revision else "")
    try:
        if hf_constants.HF_HUB_OFFLINE:
            path = Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
            config = json.loads((path / "config.json").read_text())
            if supported is not None:
                check_architecture(config, repo, supported)
            return path
        info = HfApi().model_info(repo, revision=revision)
        files = {s.rfilename for s in info.siblings or []}
        if "config.json" not in files:
            raise HubError(f"{where} has no config.json, so it is not a transformers checkpoint.")
        if not any(f.endswith(".safetensors") for f in files):
            raise HubError(f"{where} has no *.safetensors weights (only {', '.join(sorted(files)[:8])}); "
                           f"mini-sglang loads safetensors. {LOCAL_HINT}")
        config = json.loads(Path(hf_hub_download(repo, "config.json", revision=revision)).read_text())
        if supported is not None:
            check_architecture(config, repo, supported)
        print(f"[mini-sglang] downloading {where} (commit {info.sha}) into {hf_constants.HF_HUB_CACHE}; "
              "later starts use the cache", file=sys.stderr, flush=True)
        # by name, not by info.sha: the cache then records the ref, so HF_HUB_OFFLINE=1 finds it next time
        return Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except HubError:
        raise
    except GatedRepoError:
        raise HubError(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN to a token that may read it.") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo} was not found on {hf_constants.ENDPOINT} (or it is private: set HF_TOKEN). "
                       f"{LOCAL_HINT}") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo} has no revision {revision!r} (--revision / MODEL_REVISION).") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, EntryNotFoundError, FileNotFoundError) as e:
        if hf_constants.HF_HUB_OFFLINE:
            raise HubError(f"HF_HUB_OFFLINE is set and {where} is not in the Hugging Face cache "
                           f"({hf_constants.HF_HUB_CACHE}). Unset HF_HUB_OFFLINE to download it once, or set "
                           "MODEL_LOCAL_DIR to a local folder with the checkpoint.") from None
        raise HubError(_offline_message(where, e)) from None
    except (HfHubHTTPError, OSError) as e:
        raise HubError(_offline_message(where, e)) from None
    except Exception as e:  # httpx connection errors and the like: the Hub is unreachable
        if "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
            raise HubError(_offline_message(where, e)) from None
        raise


def _offline_message(where: str, e: BaseException) -> str:
    from huggingface_hub import constants as hf_constants

    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"could not download {where} from the Hugging Face Hub at {hf_constants.ENDPOINT} "
            f"({type(e).__name__}: {reason}). "
            f"Without a network: download the checkpoint elsewhere and set MODEL_LOCAL_DIR=/path/to/it "
            f"(a folder with config.json, *.safetensors and the tokenizer files), or set HF_HUB_OFFLINE=1 if it "
            f"is already in the Hugging Face cache ({hf_constants.HF_HUB_CACHE}).")
