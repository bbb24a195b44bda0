"""Model store: registry listing, default model, cache folder, fetch from a local HTTP server with SHA-256."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial

import pytest

from nephireg import modelstore
from nephireg.errors import InputError


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(modelstore.CACHE_ENV, str(folder))
    return folder


@pytest.fixture()
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _registry(url: str, sha: str):
    return {"default": "shipped", "models": [
        {"name": "shipped", "file": "definitely-absent.pt", "anatomy": "lung", "modality": "CT"},
        {"name": "remote", "url": url, "sha256": sha, "anatomy": "brain", "modality": "MRI"}]}


def test_cache_dir_follows_the_environment(cache):
    assert modelstore.cache_dir() == str(cache)


def test_fetch_with_a_good_checksum_then_use_the_cache(cache, server):
    www, base = server
    payload = b"model bytes " * 5000
    (www / "m.pt").write_bytes(payload)
    registry = _registry(f"{base}/m.pt", hashlib.sha256(payload).hexdigest())
    seen = []
    path = modelstore.resolve_model("remote", progress=lambda done, total: seen.append((done, total)),
                                    registry=registry)
    assert open(path, "rb").read() == payload and path.startswith(str(cache))
    assert seen[-1] == (len(payload), len(payload))
    listed = {m["name"]: m for m in modelstore.list_models(registry)}
    assert listed["remote"]["installed"] and listed["remote"]["path"] == path
    (www / "m.pt").unlink()  # second use: from the cache, no download
    assert modelstore.resolve_model("remote", registry=registry) == path


def test_fetch_with_a_bad_checksum_keeps_nothing(cache, server):
    www, base = server
    (www / "m.pt").write_bytes(b"tampered")
    registry = _registry(f"{base}/m.pt", "0" * 64)
    with pytest.raises(InputError, match="checksum mismatch"):
        modelstore.resolve_model("remote", registry=registry)
    assert list(cache.iterdir()) == []  # no partial or unverified file left behind
    assert not modelstore.list_models(registry)[1]["installed"]


def test_unknown_names_missing_files_and_failed_downloads_are_stated(cache, server, tmp_path):
    _, base = server
    registry = _registry(f"{base}/absent.pt", "1" * 64)
    with pytest.raises(InputError, match="unknown model 'nope'"):
        modelstore.resolve_model("nope", registry=registry)
    with pytest.raises(InputError, match="model file not found"):
        modelstore.resolve_model(str(tmp_path / "missing.pt"), registry=registry)
    with pytest.raises(InputError, match="download failed"):
        modelstore.resolve_model("remote", registry=registry)
    assert modelstore.default_model_path(registry) is None  # shipped file absent -> no default


def test_user_models_in_the_cache_are_listed(cache):
    cache.mkdir()
    (cache / "my-model.pt").write_bytes(b"x")
    names = {m["name"]: m for m in modelstore.list_models({"models": []})}
    assert names["my-model"]["source"] == "cache"
    assert modelstore.resolve_model("my-model", registry={"models": []}) == str(cache / "my-model.pt")


def test_the_shipped_registry_is_valid_and_stdlib_only():
    registry = modelstore.load_registry()
    assert registry["default"] in {m["name"] for m in registry["models"]}
    import ast

    tree = ast.parse(open(modelstore.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"torch", "numpy", "SimpleITK"}


def test_models_subcommand_lists_and_reports_errors(cache, capsys):
    import json

    from nephireg.cli import main

    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert any(m["default"] for m in listed)
    assert main(["models", "--info", str(cache / "absent.pt")]) == int(InputError.exit_code)
    err = capsys.readouterr().err
    assert "model file not found" in err
