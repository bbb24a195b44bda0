"""Shared fixtures: small real-shaped synthetic volumes made here (no shared data needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from nephireg.errors import Cancelled
from nephireg.progress import SilentReporter

# The suite's own commands run in their own processes: never in an engine server the user may have running
# (test_engine_server.py starts its own and names it explicitly).
os.environ["NEPHIREG_SERVER"] = "off"

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test (with the reason) when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the shared development data at {path} (absent on a fresh clone)")
    return path


@pytest.fixture(scope="session")
def small_pair(tmp_path_factory):
    """A small oblique, anisotropic thorax phantom pair with a known smooth deformation, written as NRRD.

    Returns a dict: fixed, moving, fixed_mask (paths), truth (Z, Y, X, 3) mm, grid, mask (bool array).
    """
    import SimpleITK as sitk

    from nephireg import io
    from nephireg.geometry import Grid
    from nephireg.synthetic import deform, random_displacement, rotation_direction, thorax_phantom

    folder = tmp_path_factory.mktemp("pair")
    grid = Grid((56, 48, 36), (3.0, 3.3, 4.2), (-80.0, -70.0, -300.0), rotation_direction((7.0, -5.0, 10.0)))
    fixed, fixed_mask = thorax_phantom(grid, seed=3)
    truth = random_displacement(grid, amplitude_mm=7.0, sigma_mm=12.0, seed=4)
    moving = deform(fixed, truth, grid)
    paths = {"fixed": folder / "fixed.nrrd", "moving": folder / "moving.nrrd", "fixed_mask": folder / "fixed_mask.nrrd"}
    io.write_image(fixed, paths["fixed"])
    io.write_image(moving, paths["moving"])
    io.write_image(fixed_mask, paths["fixed_mask"])
    mask = sitk.GetArrayFromImage(fixed_mask) > 0
    return {**{k: str(v) for k, v in paths.items()}, "truth": truth, "grid": grid, "mask": mask}


def sample_mask(mask: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """A random subset of ``count`` voxels of ``mask`` (same shape, bool)."""
    rng = np.random.default_rng(seed)
    chosen = np.zeros(mask.size, dtype=bool)
    chosen[rng.choice(np.flatnonzero(mask), size=min(count, int(mask.sum())), replace=False)] = True
    return chosen.reshape(mask.shape)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a busy shared 2-core machine two OpenMP threads wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class StageLog(SilentReporter):
    """A silent reporter that records the names of the stages it is told, in order (``.names``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names = []

    def stage(self, name, message=""):
        self.names.append(name)
        super().stage(name, message)


class CancelOnCall:
    """A ``cancel`` callback that counts its calls (``.calls``) and raises Cancelled on call number ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise Cancelled()


def process_gone(pid: int) -> bool:
    """No process ``pid`` any more, or only its exit status (a zombie) is left (Linux: reads /proc)."""
    from pathlib import Path

    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return next(line.split()[1] for line in status.splitlines() if line.startswith("State:")) in ("Z", "X")


@pytest.fixture
def fake_slicer(tmp_path, monkeypatch):
    """The module's run logic on a real scene (slicer-core) with only Slicer's application parts replaced (its temp
    folder, its startup environment): the logic module, scene, logics, a fixed and a moving volume, the temp root."""
    import importlib
    import sys
    import types

    from slicer_scene import add_volume, new_app, require_slicer_core

    require_slicer_core()
    import slicer

    from NePhiRegistrationLib import selftest

    temp_root = tmp_path / "Slicer temp ünï"
    temp_root.mkdir()
    counter = iter(range(1000))

    def temp_directory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
        path = temp_root / f"{key}{next(counter)}"
        path.mkdir()
        return str(path)

    # the application's parts of slicer.util (slicer.app has no object here)
    monkeypatch.setattr(slicer.util, "tempDirectory", temp_directory, raising=False)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: dict(os.environ), raising=False)
    app = new_app()
    monkeypatch.delitem(sys.modules, "NePhiRegistrationLib.logic", raising=False)
    logic = importlib.import_module("NePhiRegistrationLib.logic")
    # no engine server after each run here (its own tests: test_slicer_engine_server.py); a test may set it back
    monkeypatch.setattr(logic.engineserver, "supported", lambda: False)
    fixedArray, movingArray = selftest.volumeArraysOnGrid()
    fixed = add_volume(app.scene, fixedArray, selftest.TEST_GRID.ijk_to_ras(), "fixed")
    moving = add_volume(app.scene, movingArray, selftest.TEST_GRID.ijk_to_ras(), "moving")
    yield types.SimpleNamespace(logic=logic, sceneio=app.sceneio, logics=app.logics, scene=app.scene, fixed=fixed,
                                moving=moving, temp_root=temp_root)
    logic.engineserver.stopShared()
    sys.modules.pop("NePhiRegistrationLib.logic", None)

