"""Where NePhi models live: the shipped default inside the package, a user cache, and a registry of more.

STANDARD LIBRARY ONLY: the Slicer module imports this in Slicer's own process (to list models, show the cache
folder and fetch a model with a progress bar) where torch may be absent.

* Shipped models: ``nephireg/models/*.pt``, named in ``nephireg/models/registry.json`` with ``"file"``.
* Further models: registry entries with ``"url"`` and ``"sha256"``; :func:`fetch` downloads one on first use into
  :func:`cache_dir` (``$NEPHIREG_CACHE_DIR`` or the platform's user cache), verifying the SHA-256 before the file
  takes its final name, so a partial or altered download is never used.
* Any other ``*.pt`` a user drops into the cache folder is listed too (by file stem), and ``--model PATH`` takes
  any file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from nephireg.errors import InputError
from nephireg.staging import remove_stale, staged_name

MODELS_DIR = Path(__file__).resolve().parent / "models"
REGISTRY_FILE = MODELS_DIR / "registry.json"
CACHE_ENV = "NEPHIREG_CACHE_DIR"
MODEL_SUFFIX = ".pt"
READ_TIMEOUT_S = 60.0  # no byte for this long: the connection is dead
DOWNLOAD_BLOCK = 1 << 16
Progress = Callable[[int, Optional[int]], None]
"""``progress(bytes_done, bytes_total_or_None)`` during a download."""


def cache_dir() -> str:
    """The user cache folder for downloaded models (not created here)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return os.path.abspath(os.path.expanduser(override))
    if sys.platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
        return os.path.join(base, "nephireg", "Cache")
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Caches/nephireg")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "nephireg")


def load_registry(path: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """The registry JSON: ``{"default": name, "models": [{name, anatomy, modality, description, file | url,
    sha256, size_bytes}]}``."""
    path = Path(path) if path else REGISTRY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the model registry: {exc}", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise InputError("model registry has no 'models' list", path)
    return data


def list_models(registry: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
    """Every known model: registry entries (shipped or fetchable) and extra ``*.pt`` files in the cache.

    Each dict has name, anatomy, modality, description, source ("shipped" | "registry" | "cache"),
    installed (bool), path (str or None), url, sha256, default (bool)."""
    registry = registry if registry is not None else load_registry()
    default = registry.get("default")
    out = []
    for entry in registry["models"]:
        path = _installed_path(entry)
        out.append({"name": entry["name"], "anatomy": entry.get("anatomy", ""),
                    "modality": entry.get("modality", ""), "description": entry.get("description", ""),
                    "source": "shipped" if entry.get("file") else "registry", "installed": path is not None,
                    "path": path, "url": entry.get("url"), "sha256": entry.get("sha256"),
                    "default": entry["name"] == default})
    known = {m["name"] for m in out}
    folder = Path(cache_dir())
    if folder.is_dir():
        for file in sorted(folder.glob("*" + MODEL_SUFFIX)):
            if file.stem not in known:
                out.append({"name": file.stem, "anatomy": "", "modality": "", "description": "user model",
                            "source": "cache", "installed": True, "path": str(file), "url": None,
                            "sha256": None, "default": False})
    return out


def default_model_path(registry: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Path of the default model if it is installed (shipped models always are), else None."""
    try:
        registry = registry if registry is not None else load_registry()
    except InputError:
        return None
    for entry in registry["models"]:
        if entry["name"] == registry.get("default"):
            return _installed_path(entry)
    return None


def resolve_model(name_or_path: Optional[str], progress: Optional[Progress] = None,
                  registry: Optional[Mapping[str, Any]] = None) -> str:
    """A model file path from a path, a registry/cache name, or None (the default). Fetches registry models
    that are not in the cache yet. Raises :class:`InputError` for unknown names."""
    if name_or_path and (os.sep in name_or_path or name_or_path.endswith(MODEL_SUFFIX) or
                         os.path.exists(name_or_path)):
        if not os.path.isfile(name_or_path):
            raise InputError("model file not found", name_or_path)
        return os.path.abspath(name_or_path)
    registry = registry if registry is not None else load_registry()
    name = name_or_path or registry.get("default")
    for entry in registry["models"]:
        if entry["name"] == name:
            return _installed_path(entry) or fetch(entry, progress)
    cached = Path(cache_dir()) / f"{name}{MODEL_SUFFIX}"
    if cached.is_file():
        return str(cached)
    names = ", ".join(m["name"] for m in list_models(registry)) or "none"
    raise InputError(f"unknown model {name!r}; known models: {names}")


def fetch(entry: Mapping[str, Any], progress: Optional[Progress] = None, timeout_s: float = 600.0) -> str:
    """Download a registry model into the cache, verifying its SHA-256; returns the file path.

    ``timeout_s`` is a deadline for the whole download (a server that trickles bytes cannot hold a run
    forever). The download goes to a private ``.NAME.<host>-<pid>-<token>.part`` file, removed on any failure;
    ``.part`` files of killed downloads are removed by the next fetch."""
    url, expected = entry.get("url"), str(entry.get("sha256", "")).lower()
    if not url or len(expected) != 64:
        raise InputError(f"registry entry {entry.get('name')!r} needs a url and a 64-hex-digit sha256")
    folder = Path(cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{entry['name']}{MODEL_SUFFIX}"
    prefix = f".{entry['name']}."
    remove_stale(folder, prefix)
    partial = folder / staged_name(prefix, ".part")
    try:
        with open(partial, "wb") as out:
            digest = _download(url, out, progress, timeout_s)
        if digest != expected:
            raise InputError(f"checksum mismatch for model {entry['name']!r}: expected sha256 {expected}, "
                             f"downloaded {digest}; the file was discarded", url)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return str(target)


def sha256_of(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, out, progress: Optional[Progress], timeout_s: float) -> str:
    """Copy ``url`` into ``out``; InputError past the deadline ``timeout_s`` (seconds for the whole download)."""
    digest = hashlib.sha256()
    deadline = time.monotonic() + timeout_s
    try:
        with urllib.request.urlopen(url, timeout=min(timeout_s, READ_TIMEOUT_S)) as response:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            done = 0
            read = getattr(response, "read1", response.read)  # read1: returns what arrived, so the deadline holds
            for block in iter(lambda: read(DOWNLOAD_BLOCK), b""):
                out.write(block)
                digest.update(block)
                done += len(block)
                if progress:
                    progress(done, total)
                if time.monotonic() > deadline:
                    raise InputError(f"download took longer than {timeout_s:g} s (got {done} bytes); try again "
                                     "later or fetch the file by hand", url)
    except OSError as exc:  # URLError, HTTPError and socket errors are all OSErrors
        raise InputError(f"download failed: {exc}", url) from None
    return digest.hexdigest()


def _installed_path(entry: Mapping[str, Any]) -> Optional[str]:
    """The file of a shipped model, or of a registry model already in the cache (checksum verified)."""
    if entry.get("file"):
        path = MODELS_DIR / entry["file"]
        return str(path) if path.is_file() else None
    cached = Path(cache_dir()) / f"{entry['name']}{MODEL_SUFFIX}"
    if cached.is_file() and sha256_of(cached) == str(entry.get("sha256", "")).lower():
        return str(cached)
    return None
