"""Where NePhi models live: the shipped default inside the package, a user cache, and a registry of more.

STANDARD LIBRARY ONLY: the Slicer module imports this in Slicer's own process (to list models, show the cache
folder and fetch a model with a progress bar) where torch may be absent.

* Shipped models: ``nephireg/models/*.pt``, named in ``nephireg/models/registry.json`` with ``"file"``.
* Further models: registry entries with ``"url"`` and ``"sha256"``; :func:`fetch` downloads one on first use into
  :func:`cache_dir` (``$NEPHIREG_CACHE_DIR`` or the platform's user cache), verifying the SHA-256 before the file
  takes its final name, so a partial or altered download is never used.
* Any other ``*.pt`` a user drops into the cache folder is listed too (by file stem), and ``--model PATH`` takes
  any file.
* Intended use: each registry entry states ``anatomy``, ``modality`` and the intensity ``preset`` its model was
  trained for, and ``"defaults"`` names the model each preset uses (``"default"``: every other preset). Model
  files carry the same three fields in ``metadata["intended_use"]`` (written by ``nephireg train``);
  :func:`intended_use` reads either, without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import time
import urllib.request
import zipfile
from collections import OrderedDict
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
INTENDED_USE_KEYS = ("anatomy", "modality", "preset")
"""What a model was trained for: anatomy ("lung", "brain"), modality ("CT", "MRI") and the intensity preset
(:data:`nephireg.protocol.PRESETS`) whose normalisation its training images had."""


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
    """The registry JSON: ``{"default": name, "defaults": {preset: name}, "models": [{name, anatomy, modality,
    preset, description, card, file | url, sha256, size_bytes}]}``."""
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

    Each dict has name, anatomy, modality, preset, description, source ("shipped" | "registry" | "cache"),
    installed (bool), path (str or None), url, sha256, default (bool: the fallback default), default_for (the
    presets whose default it is, sorted)."""
    registry = registry if registry is not None else load_registry()
    default = registry.get("default")
    defaults = registry.get("defaults") or {}
    out = []
    for entry in registry["models"]:
        path = _installed_path(entry)
        out.append({"name": entry["name"], "anatomy": entry.get("anatomy", ""),
                    "modality": entry.get("modality", ""), "preset": entry.get("preset", ""),
                    "description": entry.get("description", ""),
                    "source": "shipped" if entry.get("file") else "registry", "installed": path is not None,
                    "path": path, "url": entry.get("url"), "sha256": entry.get("sha256"),
                    "default": entry["name"] == default,
                    "default_for": sorted(p for p, name in defaults.items() if name == entry["name"])})
    known = {m["name"] for m in out}
    folder = Path(cache_dir())
    if folder.is_dir():
        for file in sorted(folder.glob("*" + MODEL_SUFFIX)):
            if file.stem not in known:
                use = read_file_intended_use(file) or {}
                out.append({"name": file.stem, "anatomy": use.get("anatomy", ""),
                            "modality": use.get("modality", ""), "preset": use.get("preset", ""),
                            "description": "user model", "source": "cache", "installed": True, "path": str(file),
                            "url": None, "sha256": None, "default": False, "default_for": []})
    return out


def default_model_name(preset: Optional[str] = None, registry: Optional[Mapping[str, Any]] = None
                       ) -> Optional[str]:
    """The registry name of the default model for ``preset`` (``"defaults"``), else the overall ``"default"``."""
    registry = registry if registry is not None else load_registry()
    return (registry.get("defaults") or {}).get(preset) or registry.get("default")


def intended_use(name_or_path: Optional[str], registry: Optional[Mapping[str, Any]] = None
                 ) -> Optional[Dict[str, str]]:
    """``{"anatomy", "modality", "preset"}`` of a model, or None when unknown.

    A registry name (None: the default) gives its entry's fields; a file path gives its registry entry's fields
    when it is a registry model's file, else what the file itself states (:func:`read_file_intended_use`)."""
    try:
        registry = registry if registry is not None else load_registry()
    except InputError:
        registry = {"models": []}
    if name_or_path and _looks_like_path(name_or_path):
        path = os.path.abspath(name_or_path)
        for entry in registry["models"]:
            installed = _installed_path(entry)
            if installed and os.path.abspath(installed) == path:
                return _entry_use(entry)
        return read_file_intended_use(path)
    name = name_or_path or registry.get("default")
    for entry in registry["models"]:
        if entry["name"] == name:
            return _entry_use(entry)
    cached = Path(cache_dir()) / f"{name}{MODEL_SUFFIX}"
    return read_file_intended_use(cached) if cached.is_file() else None


def read_file_intended_use(path: os.PathLike) -> Optional[Dict[str, str]]:
    """``metadata["intended_use"]`` of a model file, read without torch; None when absent or unreadable.

    A model file is a ``torch.save`` zip whose ``data.pkl`` holds plain containers and tensors. The unpickler
    here resolves no global except ``collections.OrderedDict`` and torch's tensor-rebuild functions, which it
    replaces by a stub (tensor data is never read), so no code from the file runs."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if member is None:
                return None
            with archive.open(member) as f:
                payload = _WeightsFreeUnpickler(f).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError):
        return None
    metadata = payload.get("metadata") if isinstance(payload, dict) else None
    return valid_intended_use(metadata.get("intended_use") if isinstance(metadata, dict) else None)


def valid_intended_use(value: Any) -> Optional[Dict[str, str]]:
    """``value`` as an intended-use dict when it has all of :data:`INTENDED_USE_KEYS` as non-empty strings."""
    if not isinstance(value, dict) or not all(isinstance(value.get(k), str) and value[k] for k in INTENDED_USE_KEYS):
        return None
    return {k: value[k] for k in INTENDED_USE_KEYS}


class _WeightsFreeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" or module.startswith("torch."):
            return _tensor_stub
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):  # tensor storages: not read
        return None


def _tensor_stub(*args, **kwargs) -> None:
    return None


def _entry_use(entry: Mapping[str, Any]) -> Optional[Dict[str, str]]:
    return valid_intended_use({k: entry.get(k) for k in INTENDED_USE_KEYS})


def _looks_like_path(name_or_path: str) -> bool:
    return os.sep in name_or_path or name_or_path.endswith(MODEL_SUFFIX) or os.path.exists(name_or_path)


def default_model_path(registry: Optional[Mapping[str, Any]] = None, preset: Optional[str] = None
                       ) -> Optional[str]:
    """Path of the default model (of ``preset``, see :func:`default_model_name`) if it is installed (shipped
    models always are), else None."""
    try:
        registry = registry if registry is not None else load_registry()
    except InputError:
        return None
    name = default_model_name(preset, registry)
    for entry in registry["models"]:
        if entry["name"] == name:
            return _installed_path(entry)
    return None


def resolve_model(name_or_path: Optional[str], progress: Optional[Progress] = None,
                  registry: Optional[Mapping[str, Any]] = None, preset: Optional[str] = None) -> str:
    """A model file path from a path, a registry/cache name, or None (the default model of ``preset``, see
    :func:`default_model_name`). Fetches registry models that are not in the cache yet. Raises
    :class:`InputError` for unknown names."""
    if name_or_path and _looks_like_path(name_or_path):
        if not os.path.isfile(name_or_path):
            raise InputError("model file not found", name_or_path)
        return os.path.abspath(name_or_path)
    registry = registry if registry is not None else load_registry()
    name = name_or_path or default_model_name(preset, registry)
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
