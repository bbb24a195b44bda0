"""Reading inputs (DICOM series, point files) and the built-in demo, end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nephireg import io
from nephireg.errors import InputError
from nephireg.geometry import Grid


def _write_dicom_series(folder, volume: np.ndarray, spacing=(0.8, 0.9, 2.5), origin=(-10.0, 5.0, 30.0)):
    """One slice per file, with the position/orientation tags SimpleITK needs to rebuild the volume."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.shape[0]):
        image = sitk.GetImageFromArray(volume[k:k + 1].astype(np.int16))
        image.SetSpacing(spacing)
        position = (origin[0], origin[1], origin[2] + k * spacing[2])
        for tag, value in (("0020|000d", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.2"),
                           ("0008|0060", "CT"), ("0020|0032", "\\".join(map(str, position))),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k + 1)),
                           ("0028|0030", f"{spacing[1]}\\{spacing[0]}"), ("0018|0050", str(spacing[2]))):
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)


def test_dicom_folder_reads_as_one_volume(tmp_path):
    volume = (np.random.default_rng(0).random((6, 10, 12)) * 1000).astype(np.int16)
    _write_dicom_series(tmp_path / "series", volume)
    image = io.read_image(tmp_path / "series", "fixed")
    assert image.GetSize() == (12, 10, 6)
    assert np.allclose(image.GetSpacing(), (0.8, 0.9, 2.5), atol=1e-4)
    assert np.allclose(image.GetOrigin(), (-10.0, 5.0, 30.0), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(image), volume.astype(np.float32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no DICOM series"):
        io.read_image(tmp_path / "empty", "fixed")


def test_points_round_trip_and_bad_point_file(tmp_path):
    points = np.array([[1.5, -2.25, 3.0], [4.0, 5.0, -6.125]])
    io.write_points(points, tmp_path / "p.txt")
    assert np.allclose(io.read_points(tmp_path / "p.txt"), points)
    (tmp_path / "bad.txt").write_text("point\n1\n1 2\n")
    with pytest.raises(InputError, match="3 are needed"):
        io.read_points(tmp_path / "bad.txt")


def test_mask_from_a_label_map_is_binary_on_its_image_grid(small_pair, tmp_path):
    image = io.read_image(small_pair["fixed"])
    labels = sitk.Cast(sitk.ReadImage(small_pair["fixed_mask"]), sitk.sitkUInt8) * 7
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    mask = io.read_mask(tmp_path / "labels.nrrd", image)
    assert set(np.unique(sitk.GetArrayFromImage(mask))) == {0, 1}
    assert io.same_grid(Grid.of(mask), Grid.of(image))


def test_demo_runs_end_to_end_and_scores_itself(tmp_path):
    """The README's main job, shortened: the built-in pair, lung-ct preset (derived masks, centre pre-alignment)."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "nephireg", "demo", "--out", str(out), "--progress", "none",
                           "--option", "iterations=15", "--option", "coarse_iterations=15"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "result.json").read_text())
    error = manifest["demo_error_mm"]
    assert manifest["preset"] == "lung-ct" and manifest["parameters"]["masks"] == "derived (lung)"
    assert error["mean"] < 0.6 * error["before_mean"], error
    assert "demo: error inside the lungs" in proc.stdout
    for name in manifest["files"].values():
        assert (out / name).exists()
