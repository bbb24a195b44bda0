"""The process protocol between the engine and its callers (the Slicer module, scripts, batch runners).

Standard library only: the Slicer module imports this file inside Slicer's own process, where torch is absent.
This is the one home of the protocol; both halves import it and nothing restates it.

Protocol version 1
------------------
Command line::

    python -m nephireg register --fixed F --moving M [--fixed-mask FM] [--moving-mask MM]
        --method {adam,nephi,nephi-io} [--preset {lung-ct,brain-mri,generic}] [--device {auto,cpu,cuda}]
        [expert options] --out DIR [--progress jsonl] [--overwrite]

Progress (``--progress jsonl``): one JSON object per stdout line, each with ``"v": PROTOCOL_VERSION`` and
``"event"`` one of :class:`Event`:

* ``start``     ``{method, preset, device, out}``
* ``stage``     ``{stage, message}`` - a new stage begins (read, preprocess, prealign, optimise, write ...)
* ``progress``  ``{stage, step, total, loss, elapsed_s, eta_s}`` - ``loss`` may be null
* ``log``       ``{level, message}`` - ``level`` is ``info`` / ``warning``
* ``warning``   ``{code, message}`` - the result may be doubtful or the run changed course (the run goes on);
  ``code`` is a stable identifier; every warning of a run is also listed in the manifest's ``warnings``
* ``result``    ``{manifest, metrics}`` - ``manifest`` is the path of ``result.json``; always the last line on success
* ``error``     ``{code, kind, message}`` - ``code`` is the process exit code; always the last line on failure

Lines that are not JSON objects (a stray print from a library) must be ignored by readers:
:func:`parse_event_line` returns None for them.

Result folder (``--out DIR``): :data:`RESULT_MANIFEST` (``result.json``) is written last, atomically; a folder
without it holds no result. The manifest's ``files`` maps :data:`OUTPUT_FILES` keys to file names relative to
the folder.

Exit codes: :class:`ExitCode`.
"""

from __future__ import annotations

import enum
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

PROTOCOL_VERSION = 1

METHODS = ("adam", "nephi", "nephi-io")
METHOD_LABELS = {"adam": "Continuous Adam", "nephi": "NePhi predict", "nephi-io": "NePhi + IO"}
PRESETS = ("lung-ct", "brain-mri", "generic")
PRESET_LABELS = {"lung-ct": "Lung CT", "brain-mri": "Brain MRI", "generic": "Generic"}
DEVICES = ("auto", "cpu", "cuda")
PREALIGN_MODES = ("preset", "none", "center", "moments", "rigid", "affine")

RESULT_MANIFEST = "result.json"
# Keys of the manifest's "files" mapping and the file names the engine writes.
OUTPUT_FILES = {
    "transform": "transform.h5",  # ITK DisplacementFieldTransform, LPS mm, fixed grid, fixed -> moving
    "inverse": "inverse.h5",  # ITK DisplacementFieldTransform, LPS mm, over the moving image, moving -> fixed
    "jacobian": "jacobian.nrrd",  # float32 det(D phi) on the fixed grid
    "warped": "warped.nrrd",  # moving resampled onto the fixed grid through the transform
    "overview": "overview.png",  # fixed / warped / checkerboard / Jacobian slices
}


class ExitCode(enum.IntEnum):
    """Process exit codes of ``nephireg`` commands."""

    SUCCESS = 0
    INTERNAL_ERROR = 1
    BAD_INPUT = 2  # also argparse's code for a bad command line
    CANCELLED = 3  # SIGINT / SIGTERM
    OUT_OF_MEMORY = 4  # the device ran out of memory; the caller may retry with --device cpu


class Event(str, enum.Enum):
    START = "start"
    STAGE = "stage"
    PROGRESS = "progress"
    LOG = "log"
    WARNING = "warning"
    RESULT = "result"
    ERROR = "error"


def encode_event(event: Event, **fields: Any) -> str:
    """One protocol line (no trailing newline) for ``event`` with ``fields``."""
    payload: Dict[str, Any] = {"v": PROTOCOL_VERSION, "event": Event(event).value}
    payload.update(fields)
    return json.dumps(payload, allow_nan=False, default=str)


def parse_event_line(line: str) -> Optional[Dict[str, Any]]:
    """The event in one stdout line, or None when the line is not a protocol event (ignore it)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        payload = json.loads(line)
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("v") != PROTOCOL_VERSION:
        return None
    if payload.get("event") not in {e.value for e in Event}:
        return None
    return payload


def register_arguments(
    fixed: str,
    moving: str,
    out: str,
    method: str = "adam",
    preset: str = "generic",
    fixed_mask: Optional[str] = None,
    moving_mask: Optional[str] = None,
    device: str = "auto",
    iterations: Optional[int] = None,
    regularization: Optional[float] = None,
    grid_spacing_mm: Optional[float] = None,
    prealign: str = "preset",
    model: Optional[str] = None,
    seed: Optional[int] = None,
    overwrite: bool = False,
    progress_jsonl: bool = True,
    write_warped: bool = True,
    initial_transform: Optional[str] = None,
    write_overview: bool = True,
) -> List[str]:
    """Arguments after ``python -m nephireg`` for one registration (the caller prepends the interpreter).

    Values are validated here so that a caller learns of a typo before a process starts.
    """
    _check_choice("method", method, METHODS)
    _check_choice("preset", preset, PRESETS)
    _check_choice("device", device, DEVICES)
    _check_choice("prealign", prealign, PREALIGN_MODES)
    args = ["register", "--fixed", os.fspath(fixed), "--moving", os.fspath(moving), "--out", os.fspath(out)]
    args += ["--method", method, "--preset", preset, "--device", device, "--prealign", prealign]
    optional = {
        "--fixed-mask": fixed_mask,
        "--moving-mask": moving_mask,
        "--iterations": iterations,
        "--regularization": regularization,
        "--grid-spacing-mm": grid_spacing_mm,
        "--model": model,
        "--seed": seed,
        "--initial-transform": initial_transform,
    }
    for flag, value in optional.items():
        if value is not None:
            args += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    if overwrite:
        args.append("--overwrite")
    if not write_warped:
        args.append("--no-warped")
    if not write_overview:
        args.append("--no-overview")
    if progress_jsonl:
        args += ["--progress", "jsonl"]
    return args


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def read_manifest(out_dir: str) -> Dict[str, Any]:
    """The result manifest of a finished run, with ``files`` made absolute. Raises FileNotFoundError if the
    folder holds no complete result."""
    path = os.path.join(out_dir, RESULT_MANIFEST)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("protocol_version") != PROTOCOL_VERSION:
        raise ValueError(f"{path}: protocol version {manifest.get('protocol_version')} is not {PROTOCOL_VERSION}")
    manifest["files"] = {k: os.path.join(out_dir, v) for k, v in manifest.get("files", {}).items()}
    return manifest


def write_manifest(out_dir: str, manifest: Mapping[str, Any]) -> str:
    """Write ``result.json`` atomically (temp file + rename), so a reader never sees a partial manifest."""
    payload = dict(manifest)
    payload["protocol_version"] = PROTOCOL_VERSION
    path = os.path.join(out_dir, RESULT_MANIFEST)
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, allow_nan=False, default=str)
    os.replace(tmp, path)
    return path
