"""The process protocol (stdlib only) and the progress reporters that speak it."""

import io as stdio
import json
import subprocess
import sys

import pytest

from nephireg.errors import Cancelled
from nephireg.progress import CallbackReporter, JsonlReporter, TerminalReporter
from nephireg.protocol import (
    OUTPUT_FILES,
    PROTOCOL_VERSION,
    RESULT_MANIFEST,
    Event,
    encode_event,
    parse_event_line,
    read_manifest,
    register_arguments,
    write_manifest,
)


def test_events_round_trip_and_junk_is_ignored():
    line = encode_event(Event.PROGRESS, stage="optimise", step=3, total=10, loss=0.5, elapsed_s=1.0, eta_s=2.0)
    event = parse_event_line(line + "\n")
    assert event == {"v": PROTOCOL_VERSION, "event": "progress", "stage": "optimise", "step": 3, "total": 10,
                     "loss": 0.5, "elapsed_s": 1.0, "eta_s": 2.0}
    for junk in ("", "hello", "{not json", "[1, 2]", json.dumps({"v": 99, "event": "progress"}),
                 json.dumps({"v": PROTOCOL_VERSION, "event": "unknown"})):
        assert parse_event_line(junk) is None


def test_nan_is_never_emitted():
    with pytest.raises(ValueError):
        encode_event(Event.LOG, value=float("nan"))
    out = stdio.StringIO()
    JsonlReporter(out).step(1, 2, loss=float("nan"))
    assert json.loads(out.getvalue())["loss"] is None


def test_register_arguments_validate_and_quote_nothing(tmp_path):
    args = register_arguments(tmp_path / "f ü.nrrd", "m.nrrd", tmp_path / "out dir", method="nephi-io",
                              preset="lung-ct", fixed_mask="fm.nrrd", iterations=50, regularization=0.3,
                              overwrite=True, write_warped=False)
    assert args[:1] == ["register"] and args[args.index("--fixed") + 1] == str(tmp_path / "f ü.nrrd")
    assert args[args.index("--iterations") + 1] == "50" and "--overwrite" in args and "--no-warped" in args
    assert args[-2:] == ["--progress", "jsonl"] and "--moving-mask" not in args
    with pytest.raises(ValueError, match="method must be one of"):
        register_arguments("f", "m", "o", method="demons")
    from nephireg.cli import build_parser

    parsed = build_parser().parse_args(args)  # the engine's own parser accepts what the protocol builds
    assert parsed.method == "nephi-io" and parsed.iterations == 50 and parsed.no_warped


def test_manifest_is_atomic_and_versioned(tmp_path):
    write_manifest(str(tmp_path), {"files": {"transform": OUTPUT_FILES["transform"]}, "metrics": {}})
    assert not list(tmp_path.glob("*.partial"))
    manifest = read_manifest(str(tmp_path))
    assert manifest["files"]["transform"] == str(tmp_path / "transform.h5")
    (tmp_path / RESULT_MANIFEST).write_text(json.dumps({"protocol_version": 0}))
    with pytest.raises(ValueError, match="protocol version"):
        read_manifest(str(tmp_path))


def test_protocol_module_imports_only_the_standard_library():
    code = ("import sys, nephireg.protocol, nephireg.geometry; "
            "print(sorted(m for m in ('torch', 'SimpleITK') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_reporter_cancellation_and_stage_timings():
    seen = []
    reporter = CallbackReporter(lambda event, fields: seen.append((event, fields)))
    reporter.stage("optimise", "Adam")
    reporter.step(1, 4, 0.25)
    reporter.request_cancel()
    with pytest.raises(Cancelled):
        reporter.step(2, 4, 0.2)
    timings = reporter.finish()
    assert set(timings) == {"optimise"} and timings["optimise"] >= 0
    assert [e for e, _ in seen] == [Event.STAGE, Event.PROGRESS]
    assert seen[1][1]["eta_s"] is not None


def test_quiet_reporter_still_reports_errors():
    from nephireg.progress import QuietReporter

    out = stdio.StringIO()
    reporter = QuietReporter(out)
    reporter.stage("optimise", "Adam")
    reporter.step(1, 2, 0.5)
    assert out.getvalue() == ""
    reporter.emit(Event.ERROR, {"code": 2, "kind": "bad-input", "message": "f.nrrd: file not found"})
    assert out.getvalue() == "error: f.nrrd: file not found\n"


def test_terminal_bar_draws_progress():
    out = stdio.StringIO()
    reporter = TerminalReporter(out, width=10)
    reporter.stage("optimise", "Adam level 1/2")
    reporter.step(10, 10, 0.1)
    reporter.log("careful", level="warning")
    text = out.getvalue()
    assert "[optimise] Adam level 1/2" in text and "|##########| 10/10" in text and "warning: careful" in text


def test_warning_event_is_emitted_and_kept_for_the_manifest():
    events = []
    reporter = CallbackReporter(lambda event, fields: events.append((event, fields)))
    reporter.warn("example-code", "something to check")
    assert events == [(Event.WARNING, {"code": "example-code", "message": "something to check"})]
    assert reporter.warnings == [{"code": "example-code", "message": "something to check"}]
    line = encode_event(Event.WARNING, **events[0][1])
    assert parse_event_line(line)["code"] == "example-code"
