"""Reading a request's inputs: in the caller's thread or prefetched in the background (while torch loads)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import StageLog
from nephireg.errors import InputError
from nephireg.inputs import Request, prefetch_inputs, read_inputs
from nephireg.presets import get_preset
from nephireg.progress import SilentReporter


@pytest.mark.parametrize("prealign", ["center", "affine"])
def test_prefetched_inputs_equal_direct_reading_and_replay_the_stages(small_pair, tmp_path, prealign):
    """The thread reads the inputs, computes the pre-alignment and resamples the pair onto the working grid (while
    the command loads torch): the same images, matrix, working arrays and stages as the pipeline doing it itself."""
    from nephireg.pipeline import prealign_matrix
    from nephireg.preprocess import working_images

    request = Request(small_pair["fixed"], small_pair["moving"], str(tmp_path / "out"), preset="lung-ct",
                      prealign=prealign)
    direct_log, prefetched_log = StageLog(), StageLog()
    direct = read_inputs(request, get_preset("lung-ct"), direct_log)
    direct_prealignment = prealign_matrix(request, get_preset("lung-ct"), direct, direct_log)
    direct_working = working_images(direct, get_preset("lung-ct"), direct_prealignment[1])
    prefetch = prefetch_inputs(request)
    prefetched = prefetch.result(prefetched_log)
    assert prefetched_log.names == ["read", "masks", "preprocess"]  # the later stages where their outcome is taken
    assert prefetched.masks_derived
    for name in ("fixed_norm", "moving_norm", "fixed_mask", "moving_mask", "fixed_region", "moving_region"):
        assert np.array_equal(sitk.GetArrayViewFromImage(getattr(direct, name)),
                              sitk.GetArrayViewFromImage(getattr(prefetched, name)))
    mode, matrix = prefetch.prealignment(prefetched_log)
    assert mode == direct_prealignment[0] == prealign
    assert np.allclose(matrix, direct_prealignment[1], atol=1e-6)
    if prealign == "affine":
        assert not np.allclose(matrix[:3, :3], np.eye(3), atol=1e-4)  # a real registration ran in the thread
    working = prefetch.working_images(prefetched_log)
    assert direct_log.names + ["prepare"] == prefetched_log.names == ["read", "masks", "preprocess", "prealign",
                                                                      "prepare"]
    assert working.grid == direct_working.grid
    for name in ("fixed", "moving", "fixed_mask", "moving_mask"):
        ours, theirs = getattr(working, name), getattr(direct_working, name)
        assert ours.dtype == np.float32 and ours.shape == working.grid.shape_zyx
        assert np.allclose(ours, theirs, atol=1e-5)  # the matrices agree to 1e-6 (threads' sums in ITK)
    assert set(np.unique(working.fixed_mask)) <= {0.0, 1.0}


def test_a_prefetched_prealignment_error_is_raised_where_the_pipeline_takes_it(small_pair, tmp_path):
    request = Request(small_pair["fixed"], small_pair["moving"], str(tmp_path / "out"), prealign="sideways")
    prefetch = prefetch_inputs(request)
    prefetch.result(SilentReporter())  # the inputs are fine
    with pytest.raises(InputError, match="unknown pre-alignment 'sideways'"):
        prefetch.prealignment(SilentReporter())


def test_a_prefetch_error_is_raised_where_the_result_is_taken(small_pair, tmp_path):
    missing = str(tmp_path / "nope.nrrd")
    prefetched = prefetch_inputs(Request(small_pair["fixed"], missing, str(tmp_path / "out")))
    with pytest.raises(InputError) as error:
        prefetched.result(SilentReporter())
    assert "nope.nrrd" in str(error.value)
    assert prefetch_inputs(Request(small_pair["fixed"], missing, str(tmp_path), preset="no-such")) is None


def test_reading_inputs_does_not_import_torch():
    code = "import sys, nephireg.inputs, nephireg.lungmask, nephireg.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_one_given_mask_the_other_is_derived(small_pair, tmp_path):
    """lung-ct with only the fixed mask: the moving image's lung mask is derived (it was left unmasked, which on
    the shared pair cost 2.81 mm against 1.33 mm with both masks or none)."""
    request = Request(small_pair["fixed"], small_pair["moving"], str(tmp_path / "out"), preset="lung-ct",
                      fixed_mask=small_pair["fixed_mask"])
    inputs = read_inputs(request, get_preset("lung-ct"), SilentReporter())
    assert inputs.mask_sources == ("given", "derived") and inputs.masks_derived
    assert inputs.describe_masks() == "fixed given, moving derived (lung)"
    assert np.array_equal(sitk.GetArrayViewFromImage(inputs.fixed_mask),
                          sitk.GetArrayFromImage(sitk.ReadImage(small_pair["fixed_mask"])))
    moving_lungs = sitk.GetArrayViewFromImage(inputs.moving_mask)
    assert 0.05 < moving_lungs.mean() < 0.5  # lungs, not empty and not the whole volume
    # The pre-alignment takes masks of one definition: the fixed image's derived mask beside the moving one's.
    from nephireg.lungmask import lung_mask

    fixed_for_alignment, moving_for_alignment = inputs.prealignment_masks()
    assert moving_for_alignment is inputs.moving_mask
    derived_fixed = sitk.GetArrayFromImage(lung_mask(sitk.ReadImage(small_pair["fixed"])))
    assert np.array_equal(sitk.GetArrayFromImage(fixed_for_alignment), derived_fixed)
    assert not np.array_equal(derived_fixed, sitk.GetArrayFromImage(inputs.fixed_mask))  # it is not the given one
    generic = read_inputs(request, get_preset("generic"), SilentReporter())  # no derivation outside lung-ct
    assert generic.moving_mask is None and generic.mask_sources == ("given", "none")
    assert generic.prealignment_masks() == (generic.fixed_mask, None)


def not_ct_like(path: str, tmp_path) -> str:
    """The CT rescaled to [0, 1], as an MRI would be: a valid image in which no lung can be found."""
    out = str(tmp_path / "rescaled.nrrd")
    sitk.WriteImage(sitk.RescaleIntensity(sitk.ReadImage(path), 0.0, 1.0), out)
    return out


class WarningLog(SilentReporter):
    def __init__(self):
        super().__init__()
        self.events = []

    def emit(self, event, fields):
        self.events.append((event.value, dict(fields)))


def test_a_failed_derivation_goes_on_with_the_other_mask_and_warns(small_pair, tmp_path):
    from nephireg.inputs import LUNG_MASK_NOT_DERIVED

    request = Request(small_pair["fixed"], not_ct_like(small_pair["moving"], tmp_path), str(tmp_path / "out"),
                      preset="lung-ct")
    for read in (lambda log: read_inputs(request, get_preset("lung-ct"), log),
                 lambda log: prefetch_inputs(request).result(log)):
        log = WarningLog()
        inputs = read(log)
        assert inputs.mask_sources == ("derived", "none") and inputs.moving_mask is None
        assert inputs.fixed_mask is not None and inputs.moving_region is None
        assert [w["code"] for w in log.warnings] == [LUNG_MASK_NOT_DERIVED]
        message = log.warnings[0]["message"]
        assert "moving image" in message and "rescaled.nrrd" in message and "fixed image's derived mask" in message
        assert [f for e, f in log.events if e == "warning"] == log.warnings  # emitted as protocol events too
        stages = [f["stage"] for e, f in log.events if e == "stage"]
        assert stages[:3] == ["read", "masks", "preprocess"]  # the prefetch goes on with the pre-alignment


def test_no_mask_at_all_runs_without_masks_and_the_manifest_says_so(small_pair, tmp_path):
    from nephireg.inputs import LUNG_MASK_NOT_DERIVED
    from nephireg.pipeline import register

    fixed = not_ct_like(small_pair["fixed"], tmp_path)
    moving = str(tmp_path / "moving.nrrd")
    sitk.WriteImage(sitk.RescaleIntensity(sitk.ReadImage(small_pair["moving"]), 0.0, 1.0), moving)
    request = Request(fixed, moving, str(tmp_path / "out"), method="adam", preset="lung-ct",
                      options={"iterations": 4, "coarse_iterations": 2}, write_overview=False)
    manifest = register(request)  # a valid image is never refused for its lung mask
    # the mask warnings (4 iterations may also leave a result-quality warning: nephireg.quality)
    mask_warnings = [w for w in manifest["warnings"] if w["code"] == LUNG_MASK_NOT_DERIVED]
    assert len(mask_warnings) == 2 and all("without masks" in w["message"] for w in mask_warnings)
    assert manifest["parameters"]["masks"] == "none"
    assert manifest["metrics"]["similarity_region"] == "whole fixed image"


def test_a_cancelled_result_stops_the_prefetched_prealignment(small_pair, tmp_path):
    """A cancellation before the inputs are taken: result() raises it and tells the thread to stop (its affine
    pre-alignment polls the flag), so no registration goes on in a process whose run has ended."""
    from nephireg.errors import Cancelled

    request = Request(small_pair["fixed"], small_pair["moving"], str(tmp_path / "out"), prealign="affine")
    prefetch = prefetch_inputs(request)
    reporter = SilentReporter()
    reporter.request_cancel()
    with pytest.raises(Cancelled):
        prefetch.result(reporter)
    assert prefetch._cancelled.is_set()
    prefetch._thread.join(30)
    assert not prefetch._thread.is_alive()


FORKED_PREFETCH = """
import json, os, sys
import numpy as np, SimpleITK as sitk
from nephireg.inputs import PrefetchedInputs, Request, prefetch_inputs, read_inputs
from nephireg.presets import get_preset
from nephireg.progress import SilentReporter

class Log(SilentReporter):
    def __init__(self):
        super().__init__()
        self.names = []

    def stage(self, name, message=""):
        self.names.append(name)

fixed, moving, out, variant = sys.argv[1:5]
if variant == "child-dies":  # the child ends before sending anything: this process's thread does the work
    PrefetchedInputs._in_child = lambda self, send: os._exit(9)
if variant == "inputs-only":  # the child dies after its first message: the thread resamples onto the working grid
    def die_after(self, send):
        self._in_child_all(lambda message: (send(message), os._exit(9)))
    PrefetchedInputs._in_child_all = PrefetchedInputs._in_child
    PrefetchedInputs._in_child = die_after
if variant == "fork-refused":  # the system refuses the fork: the thread does the work
    def refuse():
        raise OSError(11, "Resource temporarily unavailable")
    os.fork = refuse
request = Request(fixed, moving, out, preset="lung-ct", prealign="affine")
prefetch = prefetch_inputs(request)
forked = prefetch._child is not None
log = Log()
try:
    inputs = prefetch.result(log)
except Exception as exc:
    print(json.dumps({"forked": forked, "error": str(exc), "type": type(exc).__name__}))
    raise SystemExit(0)
worked_in = prefetch.worked_in
mode, matrix = prefetch.prealignment(log)
working = prefetch.working_images(log)
before = prefetch.before_registration()
prefetch._thread.join()
import gc
gc.collect()
mapped = 0  # bytes of the child's shared file still mapped here: at most the working arrays (the images' part freed)
for line in open("/proc/self/maps"):
    if "nephireg-forked" in line:
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        mapped += high - low
from nephireg.pipeline import prealign_matrix  # torch, now that the child is done
from nephireg.preprocess import working_images
from nephireg.quality import before_registration
from nephireg.geometry import Grid
direct = read_inputs(request, get_preset("lung-ct"), SilentReporter())
direct_matrix = prealign_matrix(request, get_preset("lung-ct"), direct, SilentReporter())[1]
direct_working = working_images(direct, get_preset("lung-ct"), direct_matrix)
direct_before = before_registration(direct, Grid.of(direct.fixed), direct_matrix)
same = {name: bool(np.array_equal(sitk.GetArrayViewFromImage(getattr(inputs, name)),
                                  sitk.GetArrayViewFromImage(getattr(direct, name))))
        for name in ("fixed", "moving", "fixed_norm", "moving_norm", "fixed_mask", "moving_mask", "fixed_region",
                     "moving_region")}
print(json.dumps({
    "forked": forked, "worked_in": worked_in, "stages": log.names, "same": same, "mode": mode,
    "matrix": float(np.abs(matrix - direct_matrix).max()), "window": list(map(float, inputs.moving_window)),
    "geometry": inputs.fixed.GetSpacing() == direct.fixed.GetSpacing() and
                inputs.moving.GetDirection() == direct.moving.GetDirection(),
    "working": [float(np.abs(getattr(working, n) - getattr(direct_working, n)).max())
                for n in ("fixed", "moving", "fixed_mask", "moving_mask")],
    "working_writable": bool(working.fixed.flags.writeable), "working_grid": working.grid == direct_working.grid,
    "before": before.metrics == direct_before.metrics and before.warnings == direct_before.warnings,
    "masks_derived": inputs.masks_derived, "mapped": mapped,
    "working_bytes": sum(a.nbytes for a in (working.fixed, working.moving, working.fixed_mask, working.moving_mask)
                         if a is not None)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the forked prefetch is Linux only")
@pytest.mark.parametrize("variant, forked, worked_in", [("forked", True, "child process"),
                                                         ("child-dies", True, "this process"),
                                                         ("inputs-only", True, "child process"),
                                                         ("fork-refused", False, "this process")])
def test_the_forked_prefetch_gives_what_reading_in_the_process_gives(small_pair, tmp_path, variant, forked,
                                                                    worked_in):
    """On the command line (a fresh process, no torch yet) the prefetch runs in a forked child: the same images,
    pre-alignment, working arrays, checks before registration and stages as the pipeline computing them itself.
    A child that dies without a result (``child-dies``) or after the inputs (``inputs-only``), or a fork the
    system refuses, leaves the rest to the thread: the same again."""
    done = subprocess.run([sys.executable, "-c", FORKED_PREFETCH, small_pair["fixed"], small_pair["moving"],
                           str(tmp_path / "out"), variant], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["forked"] == forked  # the child path was taken (the process had one thread and no torch)
    assert result["worked_in"] == worked_in  # who delivered the inputs
    assert result["stages"] == ["read", "masks", "preprocess", "prealign", "prepare"]
    assert all(result["same"].values()), result["same"]
    assert result["mode"] == "affine" and result["matrix"] < 1e-6 and result["geometry"]
    assert max(result["working"]) < 1e-5 and result["working_writable"] and result["working_grid"]
    assert result["before"] and result["masks_derived"]
    # what stays mapped of the child's shared file is the working arrays' message (used as they are), never the
    # images' (SimpleITK copied them: that message was unmapped and freed)
    assert result["mapped"] <= result["working_bytes"] + 64 * 1024
    assert (result["mapped"] >= result["working_bytes"]) == (variant == "forked")
    assert result["window"] == [-1000.0, 0.0]  # lung-ct's window, kept for the warped image's normalisation


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the forked prefetch is Linux only")
def test_a_forked_prefetch_error_is_the_in_process_one(small_pair, tmp_path):
    """The child meets a missing file and ends without a result; the thread reads again and raises the error as the
    in-process path does (its message names the file)."""
    missing = str(tmp_path / "nope.nrrd")
    done = subprocess.run([sys.executable, "-c", FORKED_PREFETCH, small_pair["fixed"], missing,
                           str(tmp_path / "out"), "forked"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["forked"] and result["type"] == "InputError" and "nope.nrrd" in result["error"]
