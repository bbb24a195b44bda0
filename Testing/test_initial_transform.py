"""``--initial-transform FILE``: a run starts from a given linear transform (composed before the deformable step)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nephireg import io, protocol
from nephireg.geometry import Grid
from nephireg.inputs import Request
from nephireg.pipeline import register
from nephireg.synthetic import rotation_direction, thorax_phantom

FAST = {"iterations": 30, "coarse_iterations": 20}
GRID = Grid((40, 36, 28), (3.0, 3.3, 4.0), (-60.0, -55.0, -200.0), rotation_direction((4.0, -3.0, 6.0)))


def known_affine() -> sitk.AffineTransform:
    """fixed -> moving (LPS): 6 degrees about the image centre and a 9 mm shift - far from the identity."""
    rotation = sitk.Euler3DTransform(tuple(GRID.center_physical()), 0.0, 0.0, np.deg2rad(6.0), (9.0, -4.0, 3.0))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rotation.GetMatrix())
    affine.SetTranslation(rotation.GetTranslation())
    affine.SetCenter(rotation.GetCenter())
    return affine


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """moving = fixed seen through the known affine, so fixed(x) = moving(A(x)); and A as a .tfm file."""
    folder = tmp_path_factory.mktemp("initial")
    fixed, mask = thorax_phantom(GRID, seed=5)
    affine = known_affine()
    moving = sitk.Resample(fixed, fixed, affine.GetInverse(), sitk.sitkLinear, float(np.min(sitk.GetArrayViewFromImage(
        fixed))))
    paths = {"fixed": folder / "fixed.nrrd", "moving": folder / "moving.nrrd", "initial": folder / "initial.tfm"}
    io.write_image(fixed, paths["fixed"])
    io.write_image(moving, paths["moving"])
    sitk.WriteTransform(affine, str(paths["initial"]))
    return {**{k: str(v) for k, v in paths.items()}, "mask": sitk.GetArrayFromImage(mask) > 0, "folder": folder}


def error_to_affine_mm(transform: sitk.Transform, mask: np.ndarray) -> np.ndarray:
    """|T(x) - A(x)| (mm) at the fixed mask's voxels (every 3rd)."""
    affine = known_affine()
    points = GRID.physical_points()[mask][::3]
    return np.array([np.linalg.norm(np.subtract(transform.TransformPoint(tuple(p)), affine.TransformPoint(tuple(p))))
                     for p in points])


@pytest.mark.slow
def test_a_run_from_the_initial_transform_keeps_it_in_the_result(pair, one_torch_thread):
    out = pair["folder"] / "with"
    manifest = register(Request(pair["fixed"], pair["moving"], str(out), preset="generic", options=dict(FAST),
                                initial_transform=pair["initial"], write_overview=False, write_warped=False))
    assert manifest["parameters"]["prealign"] == "initial-transform"
    composed = error_to_affine_mm(io.read_transform(out / "transform.h5"), pair["mask"])
    identity = error_to_affine_mm(sitk.Transform(3, sitk.sitkIdentity), pair["mask"])
    assert identity.mean() > 8.0  # the affine moves the mask by more than 8 mm on average
    assert composed.mean() < 0.6, composed.mean()  # the result is A(x + u(x)) with u ~ 0 (voxels are 3-4 mm)
    assert manifest["metrics"]["ncc_after"] > 0.95 > manifest["metrics"]["ncc_before"]


def test_register_arguments_pass_the_file():
    args = protocol.register_arguments("f.nrrd", "m.nrrd", "out", initial_transform="pre align.tfm")
    assert args[args.index("--initial-transform") + 1] == "pre align.tfm"
    assert "--initial-transform" not in protocol.register_arguments("f.nrrd", "m.nrrd", "out")


def _cli(capsys, *args):
    from nephireg.cli import main

    code = main([str(a) for a in args])
    printed = capsys.readouterr()
    errors = [json.loads(line) for line in printed.out.splitlines() if line.startswith("{") and '"error"' in line]
    return code, errors


@pytest.mark.parametrize("case", ["missing", "not-linear", "singular", "with-prealign"])
def test_a_bad_initial_transform_is_a_clear_input_error(pair, tmp_path, capsys, case):
    initial = pair["initial"]
    extra = []
    if case == "missing":
        initial = tmp_path / "nowhere.tfm"
    elif case == "not-linear":
        initial = tmp_path / "field.h5"
        field = sitk.Image([4, 4, 4], sitk.sitkVectorFloat64, 3)
        field.SetSpacing((20.0, 20.0, 20.0))
        sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(initial))
    elif case == "singular":
        initial = tmp_path / "flat.tfm"
        flat = sitk.AffineTransform(3)
        flat.SetMatrix((1, 0, 0, 0, 1, 0, 0, 0, 0))
        sitk.WriteTransform(flat, str(initial))
    else:
        extra = ["--prealign", "affine"]
    out = tmp_path / "out"
    code, errors = _cli(capsys, "register", "--progress", "jsonl", *extra, "--fixed", pair["fixed"], "--moving",
                        pair["moving"], "--out", out, "--initial-transform", initial)
    assert code == protocol.ExitCode.BAD_INPUT
    message = errors[-1]["message"]
    expected = {"missing": "initial transform file not found", "not-linear": "initial transform is not linear",
                "singular": "singular", "with-prealign": "replaces the pre-alignment"}[case]
    assert expected in message and str(initial) in message, message
    assert not out.exists()
