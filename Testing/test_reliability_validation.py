"""Issue 11, classes 4-6: the whole request is checked before any work; a refusal names the option or file and
what is allowed, exits 2 and leaves nothing behind (in-process runs of the real command line)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nephireg import options as option_schema
from nephireg.errors import InputError
from nephireg.methods import adam, nephi
from nephireg.protocol import ExitCode, parse_event_line


def run(capsys, *args):
    from nephireg.cli import main

    code = main([str(a) for a in args])
    printed = capsys.readouterr()
    evs = [e for e in (parse_event_line(line) for line in printed.out.splitlines()) if e is not None]
    return code, evs, printed.err


def write(path, array, spacing=(1.0, 1.0, 1.0), pixel=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if pixel is not None:
        image = sitk.Cast(image, pixel)
    sitk.WriteImage(image, str(path))
    return str(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    base = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    return {"fixed": write(folder / "f.nrrd", base), "moving": write(folder / "m.nrrd", np.roll(base, 1, axis=0))}


BAD_OPTIONS = [
    (["--regularization", "nan"], "--regularization"),
    (["--regularization", "inf"], "--regularization"),
    (["--regularization", "1e300"], "--regularization"),
    (["--option", "iterations=1.5"], "--iterations=1.5"),
    (["--option", "levels=4"], "--option levels=4"),
    (["--option", "levels=[0]"], "--option levels=[0]"),
    (["--option", "coarse_iterations=-1"], "--option coarse_iterations=-1"),
    (["--grid-spacing-mm", "0"], "--grid-spacing-mm"),
    (["--grid-spacing-mm", "-2", "--method", "nephi-io"], "--grid-spacing-mm"),  # a method that ignores it
    (["--seed", "-1"], "--seed"),
    (["--method", "nephi-io", "--option", "mask_images=\"maybe\""], "--option mask_images"),
    (["--method", "nephi-io", "--option", "output_lattice=0.5"], "--option output_lattice"),
    (["--method", "nephi-io", "--option", "coarse=\"adam\"", "--option", "coarse_iterations=0"], "coarse_iterations"),
    (["--option", "constant_until=200", "--option", "cosine_until=100"], "constant_until"),
]


@pytest.mark.parametrize("extra, named", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_every_bad_option_is_refused_before_work_naming_the_option(pair, tmp_path, capsys, extra, named):
    out = tmp_path / "out"
    code, evs, _ = run(capsys, "register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out,
                       "--progress", "jsonl", *extra)
    assert code == ExitCode.BAD_INPUT
    assert [e["event"] for e in evs] == ["start", "error"]  # no stage ran: refused before any work
    assert named in evs[-1]["message"] and "allowed" in evs[-1]["message"] or "must" in evs[-1]["message"]
    assert not out.exists()


def test_empty_and_overlong_paths_are_refused(pair, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty --fixed must not mean "the DICOM series in the current folder"
    for args, words in ((["--fixed", "", "--moving", pair["moving"]], "--fixed is empty"),
                        (["--fixed", pair["fixed"], "--moving", pair["moving"], "--moving-mask", ""], "is empty"),
                        (["--fixed", "x" * 300 + ".nrrd", "--moving", pair["moving"]], "305 bytes long")):
        code, evs, _ = run(capsys, "register", *args, "--out", tmp_path / "o", "--progress", "jsonl")
        assert code == ExitCode.BAD_INPUT and words in evs[-1]["message"], evs[-1]
        assert "\n" not in evs[-1]["message"]
    assert not (tmp_path / "o").exists()


def test_output_locations_that_cannot_hold_a_result(pair, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    cases = {tmp_path / "file": "not a folder", tmp_path / "file" / "sub": "is not a folder",
             tmp_path / "dangling": "dangling symbolic link", tmp_path / ("y" * 300): "300 bytes long"}
    for out, words in cases.items():
        code, evs, _ = run(capsys, "register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out,
                           "--progress", "jsonl")
        assert code == ExitCode.BAD_INPUT and words in evs[-1]["message"], (out, evs[-1])
        assert [e["event"] for e in evs] == ["start", "error"]


def _mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    if not _mount_tmpfs(folder, "ro,size=64k"):
        pytest.skip("needs root and mount to make a read-only file system (chmod does not stop root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_read_only_output_is_refused_before_work(pair, read_only_folder, capsys):
    code, evs, _ = run(capsys, "register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out",
                       read_only_folder / "a" / "b", "--progress", "jsonl")
    assert code == ExitCode.BAD_INPUT and [e["event"] for e in evs] == ["start", "error"]
    assert "not writable" in evs[-1]["message"] and "Read-only file system" in evs[-1]["message"]
    code, _, err = run(capsys, "warp", "--transform", pair["fixed"], "--points", pair["fixed"],
                       "--out", read_only_folder / "q.txt")
    assert code == ExitCode.BAD_INPUT and "not writable" in err and "Traceback" not in err
    assert f"error: {read_only_folder / 'q.txt'}: output location" in err  # the file, not only its folder


@pytest.mark.parametrize("settings_class, rules", [(adam.Settings, adam.OPTION_RULES),
                                                   (nephi.Settings, nephi.OPTION_RULES)])
def test_every_method_option_has_a_rule_that_bounds_it(settings_class, rules):
    assert option_schema.missing_rules(settings_class, rules) == ()
    settings_class()  # the defaults satisfy the rules
    for name, rule in rules.items():
        label = re.escape(option_schema.option_label(name))  # e.g. "--iterations", "--option coarse_level"
        if rule.kind in ("int", "float") and rule.high is not None:
            with pytest.raises(InputError, match=label):
                settings_class.from_options({name: rule.high + 1})
            with pytest.raises(InputError, match=label):
                settings_class.from_options({name: float("nan")})
        if rule.kind == "int":
            with pytest.raises(InputError, match=label):
                settings_class.from_options({name: True})  # a JSON true is not a count
    with pytest.raises(InputError, match="levels"):
        adam.Settings(levels=(4, 0))  # built directly: the same schema


def test_headers_that_would_overflow_or_are_physically_tiny(tmp_path, capsys):
    rng = np.random.default_rng(3)
    good = write(tmp_path / "good.nrrd", rng.random((24, 24, 24)).astype(np.float32))
    huge_spacing = write(tmp_path / "km.nrrd", rng.random((24, 24, 24)).astype(np.float32), spacing=(1e6,) * 3)
    nano = write(tmp_path / "nano.nrrd", rng.random((24, 24, 24)).astype(np.float32), spacing=(1e-9,) * 3)
    flat = write(tmp_path / "flat.nrrd", rng.random((6, 24, 24)).astype(np.float32))
    small = write(tmp_path / "small.nrrd", rng.random((24, 24, 24)).astype(np.float32), spacing=(0.1,) * 3)
    claims = tmp_path / "claims.nhdr"  # a header that claims 10^15 voxels over a 64-byte file
    (tmp_path / "claims.raw").write_bytes(bytes(64))
    claims.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\nencoding: raw\n"
                      "endian: little\ndata file: claims.raw\n\n")
    complex_image = sitk.RealAndImaginaryToComplex(sitk.ReadImage(good), sitk.ReadImage(good))
    sitk.WriteImage(complex_image, str(tmp_path / "complex.nrrd"))
    cases = {huge_spacing: "outside the plausible range", nano: "outside the plausible range",
             flat: "physically too small", small: "physically too small", str(claims): "header claims",
             str(tmp_path / "complex.nrrd"): "complex-valued"}
    for fixed, words in cases.items():
        out = tmp_path / "o"
        code, evs, _ = run(capsys, "register", "--fixed", fixed, "--moving", good, "--out", out,
                           "--prealign", "none", "--progress", "jsonl")
        assert code == ExitCode.BAD_INPUT and words in evs[-1]["message"] and fixed in evs[-1]["message"], evs[-1]
        assert not out.exists()


def test_a_thin_slab_is_a_valid_volume(tmp_path, capsys):
    """5 slices of 3 mm (15 mm): too thin for adam's default coarsest level (1/4 of the 2 mm working grid), so
    the refusal says how to pool less - and with that hint the slab registers."""
    rng = np.random.default_rng(5)
    base = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(rng.random((5, 48, 48)).astype(np.float32)), 2.0))
    fixed = write(tmp_path / "f.nrrd", base, spacing=(0.8, 0.8, 3.0))
    moving = write(tmp_path / "m.nrrd", np.roll(base, 2, axis=2), spacing=(0.8, 0.8, 3.0))
    args = ["register", "--fixed", fixed, "--moving", moving, "--prealign", "none", "--progress", "jsonl"]
    code, evs, _ = run(capsys, *args, "--out", tmp_path / "a")
    assert code == ExitCode.BAD_INPUT and "--option levels=[2]" in evs[-1]["message"]
    code, evs, _ = run(capsys, *args, "--out", tmp_path / "b", "--option", "levels=[2]", "--iterations", "5")
    assert code == ExitCode.SUCCESS, evs[-1]
    assert (tmp_path / "b" / "result.json").exists()


def test_demo_with_a_bad_option_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    code, evs, _ = run(capsys, "demo", "--out", out, "--option", "levels=4", "--progress", "jsonl")
    assert code == ExitCode.BAD_INPUT and "levels" in evs[-1]["message"]
    assert not out.exists()


def test_tools_refuse_overlong_inputs_and_train_refuses_to_clobber_before_work(pair, tmp_path, capsys):
    code, _, err = run(capsys, "warp", "--transform", "t" * 300 + ".h5", "--points", pair["fixed"],
                       "--out", tmp_path / "q.txt")
    assert code == ExitCode.BAD_INPUT and "File name too long" in err and "Traceback" not in err
    model = tmp_path / "model.pt"
    model.write_bytes(b"a model someone trained for a week")
    code, _, err = run(capsys, "train", "--volumes", tmp_path / "none.csv", "--out", model, "--workdir",
                       tmp_path / "work")
    assert code == ExitCode.BAD_INPUT and "--overwrite" in err
    assert model.read_bytes() == b"a model someone trained for a week" and not (tmp_path / "work").exists()


def test_a_folder_without_dicom_gives_one_line_only(pair, tmp_path):
    """ITK's own warning ("No Series were found") went to stderr before the engine's line."""
    (tmp_path / "notes.txt").write_text("not an image")
    proc = subprocess.run([sys.executable, "-m", "nephireg", "register", "--fixed", str(tmp_path), "--moving",
                           pair["moving"], "--out", str(tmp_path / "out"), "--progress", "none"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == ExitCode.BAD_INPUT
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}: fixed folder holds no DICOM series"]


def test_a_damaged_transform_gives_one_line_only(tmp_path):
    """HDF5 printed its error stack (two dozen lines) on stderr before the engine's line."""
    from nephireg import io
    from nephireg.geometry import Grid

    grid = Grid((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    whole = tmp_path / "whole.h5"
    io.write_transform(np.zeros((16, 16, 16, 3)), grid, whole)
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(whole.read_bytes()[:5000])  # a copy cut short
    proc = subprocess.run([sys.executable, "-m", "nephireg", "jacobian", "--transform", str(damaged)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == ExitCode.BAD_INPUT
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {damaged}: transform file cannot be read"), lines
