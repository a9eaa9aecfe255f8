"""Where timm's pretrained weights come from, and whether that place can be reached right now.

`pretrained: true` makes timm download through huggingface_hub, which retries an unreachable hub
for about a minute per file before giving up. `kdkit.models.factory` asks here first, which takes seconds:
with `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set, or the download host (or the `https_proxy`)
not accepting a connection within `CONNECT_SECONDS`, the weights are read from the local cache
(the Hugging Face hub cache, `$HF_HUB_CACHE`, or torch's hub folder for the few timm models with a
plain URL), and when they are not there the error says what to do.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch
from huggingface_hub import constants, try_to_load_from_cache
from timm.models import get_pretrained_cfg

CONNECT_SECONDS = 3.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a hub repo, in order


@dataclass(frozen=True)
class WeightSource:
    """Where timm downloads a model's pretrained weights from, and their local copy."""

    url: str  # the hub repository page, or the file's URL
    cache: Path  # the folder the local copy is looked for in
    files: tuple[str, ...]  # the file names looked for (in the hub cache: within the repository)
    cached: Path | None  # the local copy timm would use, if there is one


def weight_source(name: str, cache_dir: str | Path | None = None) -> WeightSource | None:
    """The source of timm's pretrained weights for `name` (None: timm has none registered).
    `cache_dir` is timm's `cache_dir` option. Raises RuntimeError for an unknown pretrained tag."""
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:  # timm prefers the hub whenever a model has a repository there
        repo, _, revision = cfg.hf_hub_id.partition("@")
        cache = Path(cache_dir or constants.HF_HUB_CACHE)
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES
        hits = [try_to_load_from_cache(repo, f, cache_dir=cache, revision=revision or None) for f in files]
        cached = next((Path(hit) for hit in hits if isinstance(hit, str)), None)
        return WeightSource(f"{constants.ENDPOINT}/{repo}", cache, files, cached)
    if cfg.url:
        cache = Path(cache_dir or Path(torch.hub.get_dir()) / "checkpoints")  # as timm's download_cached_file
        file = os.path.basename(urlsplit(cfg.url).path)
        return WeightSource(cfg.url, cache, (file,), cache / file if (cache / file).is_file() else None)
    return None


def unreachable(url: str) -> str | None:
    """Why `url` cannot be downloaded from now ("HF_HUB_OFFLINE=1 is set", "no network: ..."),
    or None when its host (or the proxy for it) accepts a connection within `CONNECT_SECONDS`."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").upper() in constants.ENV_VARS_TRUE_VALUES:
            return f"{variable}={os.environ[variable]} is set"
    if constants.is_offline_mode():
        return "huggingface_hub's offline mode is on"
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or "", via.port or 80
    error = _connect_error(host, port)
    return None if error is None else f"no network: cannot connect to {host}:{port} ({error})"


def _connect_error(host: str, port: int) -> str | None:
    """None when a TCP connection to host:port opens within `CONNECT_SECONDS`, else why not. In a
    thread, because the name lookup before it obeys no timeout."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(str(exc) or type(exc).__name__)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(CONNECT_SECONDS)
    return outcome[0] if outcome else f"no answer within {CONNECT_SECONDS:g} s"
