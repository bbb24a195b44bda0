"""Reading a request's inputs: in the caller's thread or prefetched in the background (while torch loads)."""

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nephireg.errors import InputError
from nephireg.inputs import Request, prefetch_inputs, read_inputs
from nephireg.presets import get_preset
from nephireg.progress import SilentReporter


class StageLog(SilentReporter):
    def __init__(self):
        super().__init__()
        self.names = []

    def stage(self, name, message=""):
        self.names.append(name)
        super().stage(name, message)


def test_prefetched_inputs_equal_direct_reading_and_replay_the_stages(small_pair, tmp_path):
    request = Request(small_pair["fixed"], small_pair["moving"], str(tmp_path / "out"), preset="lung-ct")
    direct_log, prefetched_log = StageLog(), StageLog()
    direct = read_inputs(request, get_preset("lung-ct"), direct_log)
    prefetched = prefetch_inputs(request).result(prefetched_log)
    assert direct_log.names == prefetched_log.names == ["read", "masks", "preprocess"]
    assert prefetched.masks_derived
    for name in ("fixed_norm", "moving_norm", "fixed_mask", "moving_mask", "fixed_region", "moving_region"):
        assert np.array_equal(sitk.GetArrayViewFromImage(getattr(direct, name)),
                              sitk.GetArrayViewFromImage(getattr(prefetched, name)))


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
