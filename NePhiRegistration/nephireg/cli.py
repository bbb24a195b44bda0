"""The ``nephireg`` command line: register, demo, warp, jacobian, batch (and models/train from nephireg.nephi).

Exit codes and progress events follow :mod:`nephireg.protocol`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional

from nephireg import __version__, signals
from nephireg.protocol import DEVICES, METHODS, PREALIGN_MODES, PRESETS, RESULT_MANIFEST, Event, ExitCode


def _common_registration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default="adam", help="registration method (default: adam)")
    parser.add_argument("--preset", choices=PRESETS, default="generic", help="anatomy/modality preset")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto uses a CUDA GPU when present")
    parser.add_argument("--prealign", choices=PREALIGN_MODES, default="preset",
                        help="pre-alignment before the deformable step (default: the preset's)")
    expert = parser.add_argument_group("expert options (default: the preset's)")
    expert.add_argument("--iterations", type=int, help="iterations (finest level for adam)")
    expert.add_argument("--regularization", type=float, help="regularisation weight lambda")
    expert.add_argument("--grid-spacing-mm", type=float, help="spacing of the finest displacement grid (adam)")
    expert.add_argument("--model", help="NePhi model file or registry name")
    expert.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="any method option, VALUE as JSON (e.g. levels=[4,2]); repeatable")
    expert.add_argument("--seed", type=int, default=0, help="random seed (runs are deterministic on CPU)")
    parser.add_argument("--progress", choices=("auto", "jsonl", "bar", "none"), default="auto",
                        help="jsonl: one JSON event per stdout line (for programs); auto: a bar on a terminal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nephireg",
                                     description="Deformable image registration (NePhi, continuous Adam).")
    parser.add_argument("--version", action="version", version=f"nephireg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser("register", help="register a moving image to a fixed image")
    reg.add_argument("--fixed", required=True, help="fixed image (any 3D format SimpleITK reads, or a DICOM folder)")
    reg.add_argument("--moving", required=True, help="moving image")
    reg.add_argument("--fixed-mask", help="fixed mask (label map; nonzero = inside)")
    reg.add_argument("--moving-mask", help="moving mask")
    reg.add_argument("--initial-transform", metavar="FILE",
                     help="ITK linear transform (fixed -> moving, LPS) to start from; replaces the pre-alignment")
    reg.add_argument("--out", required=True, help="output folder (result.json, transform.h5, jacobian.nrrd, ...)")
    reg.add_argument("--overwrite", action="store_true", help="replace a result already in --out")
    reg.add_argument("--no-warped", action="store_true", help="do not write the warped moving image")
    reg.add_argument("--no-overview", action="store_true", help="do not write overview.png")
    reg.add_argument("--no-server", action="store_true",
                     help="run in this process even when an engine server ('nephireg serve') is running")
    _common_registration_arguments(reg)
    reg.set_defaults(func=_register_command, own_boundary=True)

    demo = sub.add_parser("demo", help="register the built-in synthetic sample pair and score it")
    demo.add_argument("--out", default="nephireg-demo", help="output folder (default: ./nephireg-demo)")
    demo.add_argument("--overwrite", action="store_true")
    _common_registration_arguments(demo)
    # the sample pair is a thorax CT phantom
    demo.set_defaults(func=_demo_command, preset="lung-ct", own_boundary=True)

    serve = sub.add_parser("serve", help="keep the engine loaded: 'register' commands then run in a fork of this "
                                         "process, without torch's import (Linux)")
    serve.add_argument("--socket", help="socket path (default: $NEPHIREG_SERVER, else a private per-user folder)")
    serve.add_argument("--idle-exit", type=float, default=3600.0, metavar="SECONDS",
                       help="stop after this long without a run (default 3600; 0: never)")
    serve.add_argument("--exit-with", type=int, metavar="PID",
                       help="stop when process PID ends (the application that started this server)")
    serve.add_argument("--cancel-grace", type=float, metavar="SECONDS",
                       help="how long a cancelled run (its client gone, or the server stopping) gets to clean up "
                            "before it is killed (default 30)")
    serve.set_defaults(func=_serve_command)

    from nephireg import tools

    tools.add_subcommands(sub)
    try:
        from nephireg.nephi import cli as nephi_cli
    except ImportError:
        nephi_cli = None
    if nephi_cli is not None:
        nephi_cli.add_subcommands(sub)
    return parser


def _parse_options(args: argparse.Namespace) -> Dict[str, Any]:
    from nephireg.errors import InputError

    options: Dict[str, Any] = {"iterations": args.iterations, "regularization": args.regularization,
                               "grid_spacing_mm": args.grid_spacing_mm, "model": args.model}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option {item!r} is not KEY=VALUE")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.replace("-", "_")] = value
    return {k: v for k, v in options.items() if v is not None}


def make_reporter(mode: str):
    from nephireg.progress import JsonlReporter, QuietReporter, TerminalReporter

    if mode == "jsonl":
        return JsonlReporter(sys.stdout)
    if mode == "none":
        return QuietReporter(sys.stderr)
    return TerminalReporter(sys.stderr)  # "bar", and "auto" (stage lines stay readable in a log file too)


def run_cancellable(reporter, body: Callable[[], Dict[str, Any]]) -> int:
    """The error boundary of a run that reports events: SIGINT/SIGTERM request a cancel the run's loops see;
    every outcome becomes one ``result`` or ``error`` event (:func:`nephireg.errors.describe_failure`)."""
    from nephireg.errors import describe_failure

    try:
        with signals.cooperative(reporter.request_cancel):
            manifest = body()
    except Exception as exc:  # noqa: BLE001 - the boundary: every failure becomes its exit code and one line
        return _report_failure(reporter, exc, describe_failure(exc))
    except KeyboardInterrupt as exc:  # a caller's own SIGINT handling (library use)
        return _report_failure(reporter, exc, describe_failure(exc))
    reporter.emit(Event.RESULT, {"manifest": manifest.get("manifest_path"), "metrics": manifest.get("metrics", {})})
    return int(ExitCode.SUCCESS)


def _report_failure(reporter, exc: BaseException, failure) -> int:
    code, kind, message = failure
    if code == ExitCode.INTERNAL_ERROR:
        _print_traceback(exc)
    reporter.emit(Event.ERROR, {"code": int(code), "kind": kind, "message": message})
    return int(code)


def _print_traceback(exc: BaseException) -> None:
    from nephireg.progress import say

    say("".join(traceback.format_exception(exc)).rstrip("\n"), sys.stderr)


def _request_from(args: argparse.Namespace, fixed: str, moving: str, fixed_mask: Optional[str],
                  moving_mask: Optional[str]):
    from nephireg.inputs import Request

    return Request(fixed=fixed, moving=moving, out=args.out, method=args.method, preset=args.preset,
                   fixed_mask=fixed_mask, moving_mask=moving_mask, device=args.device, prealign=args.prealign,
                   options=_parse_options(args), seed=args.seed, overwrite=args.overwrite,
                   write_warped=not getattr(args, "no_warped", False),
                   write_overview=not getattr(args, "no_overview", False),
                   initial_transform=getattr(args, "initial_transform", None))


def _register_command(args: argparse.Namespace) -> int:
    reporter = make_reporter(args.progress)

    def body() -> Dict[str, Any]:
        from nephireg import validate
        from nephireg.errors import InputError
        from nephireg.inputs import prefetch_inputs

        held_back: Optional[InputError] = None  # raised after the start event, which must come first
        request = prefetched = None
        try:
            request = _request_from(args, args.fixed, args.moving, args.fixed_mask, args.moving_mask)
            validate.check_request(request)  # before reading anything
            prefetched = prefetch_inputs(request)  # reads the images while torch is imported below
        except InputError as exc:
            held_back = exc

        def cancel_before_torch() -> None:  # a signal during start-up: the start event, then the cancellation
            if reporter.cancel_requested:
                if prefetched is not None:
                    prefetched.cancel()
                reporter.emit(Event.START, {"method": args.method, "preset": args.preset, "device": args.device,
                                            "out": os.path.abspath(args.out)})
                reporter.check_cancel()

        cancel_before_torch()  # no need to load torch first
        pipeline = signals.import_polling("nephireg.pipeline", cancel_before_torch)  # torch: a second or more
        register, resolve_device = pipeline.register, pipeline.resolve_device

        device = args.device
        try:
            device = str(resolve_device(args.device))  # what runs, e.g. "cuda" for auto
        except InputError as exc:
            held_back = held_back or exc
        reporter.emit(Event.START, {"method": args.method, "preset": args.preset, "device": device,
                                    "out": os.path.abspath(args.out)})
        try:
            reporter.check_cancel()  # a signal during start-up
            if held_back is not None:
                raise held_back
            manifest = register(request, reporter, prefetched)
        finally:  # whatever ended the run, a prefetch still pre-aligning stops (a library call of main returns)
            if prefetched is not None:
                prefetched.cancel()
        manifest["manifest_path"] = os.path.join(os.path.abspath(args.out), RESULT_MANIFEST)
        if not isinstance(reporter, _jsonl_type()):
            _print_summary(manifest)
        return manifest

    return run_cancellable(reporter, body)


def _jsonl_type():
    from nephireg.progress import JsonlReporter

    return JsonlReporter


def _say(text: str, stream=None) -> None:
    from nephireg.progress import say

    say(text, stream)


def _number(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _print_summary(manifest: Dict[str, Any]) -> None:
    m = manifest["metrics"]
    _say(f"folding {m['folding_percent']:.4f} %  det J [{m['jacobian_min']:.3f}, {m['jacobian_max']:.3f}]  "
         f"SDlogJ {_number(m['std_log_jacobian'], '.4f')}  time {manifest['timings_s']['total']:.1f} s  "
         f"({manifest['device']})")
    prealigned = f" -> {m['ncc_prealigned']:.3f} pre-aligned" if "ncc_prealigned" in m else ""
    _say(f"NCC {m['ncc_before']:.3f} before{prealigned} -> {m['ncc_after']:.3f} after the deformable step "
         f"({m.get('similarity_region', '')})")
    if manifest.get("model"):
        model = manifest["model"]
        _say(f"model {model['name']} ({model.get('anatomy') or '?'} {model.get('modality') or '?'}, preset "
             f"{model.get('preset') or '?'}; sha256 {str(model.get('sha256'))[:12]}...)")
    for warning in manifest.get("warnings", []):
        _say(f"warning [{warning['code']}]: {warning['message']}")
    if "demo_error_mm" in manifest:
        e = manifest["demo_error_mm"]
        _say(f"demo: error inside the lungs {e['before_mean']:.2f} mm before -> mean {e['mean']:.2f} mm, "
             f"median {e['median']:.2f} mm, 95th percentile {e['p95']:.2f} mm")


def _demo_command(args: argparse.Namespace) -> int:
    reporter = make_reporter(args.progress)

    def body() -> Dict[str, Any]:
        reporter.emit(Event.START, {"method": args.method, "preset": args.preset, "device": args.device,
                                    "out": os.path.abspath(args.out)})
        demo = signals.import_polling("nephireg.demo", reporter.check_cancel)  # loads torch: a second or more
        manifest = demo.run_demo(args, reporter, _request_from)
        if not isinstance(reporter, _jsonl_type()):
            _print_summary(manifest)
        return manifest

    return run_cancellable(reporter, body)


def _serve_command(args: argparse.Namespace) -> int:
    from nephireg import engine_link, engine_server
    from nephireg.errors import InputError

    engine_server.check_idle_exit(args.idle_exit)
    path = os.path.abspath(args.socket) if args.socket else engine_link.socket_path()
    if path is None:
        raise InputError(f"no engine server socket: {engine_link.SERVER_ENV}=off and no --socket given")
    return engine_server.serve(path, args.idle_exit, lambda text: _say(text, sys.stderr), args.exit_with,
                               args.cancel_grace)


def run_command(args: argparse.Namespace) -> int:
    """The error boundary of every command: register and demo report through their own events
    (:func:`run_cancellable`); the others (warp, jacobian, batch, train, models) get SIGINT/SIGTERM as a
    :class:`~nephireg.errors.Cancelled` and every failure as its exit code and one ``error:`` line on stderr."""
    if getattr(args, "own_boundary", False):
        return int(args.func(args))
    from nephireg.errors import describe_failure

    try:
        with signals.interrupting():
            return int(args.func(args))
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the boundary
        code, _, message = describe_failure(exc)
        if code == ExitCode.INTERNAL_ERROR:
            _print_traceback(exc)
        _say(f"error: {message}", sys.stderr)
        return int(code)


def set_engine_environment() -> None:
    """The engine's defaults for variables read when torch loads; a user's own setting wins."""
    # OpenMP threads that spin while waiting turn a busy machine (another job on one of two cores) into a 2-10x
    # slowdown; passive waiting measured as fast as one thread under load. Read once, when torch loads OpenMP, so it
    # is set here, in the engine's own process, before any command imports torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Optional[List[str]] = None) -> int:
    set_engine_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(args)


def console_main() -> None:
    """The ``nephireg`` command and ``python -m nephireg``: :func:`main`, then an immediate exit.

    Once the outputs are written and the streams flushed, nothing is left to do, but the interpreter's teardown with
    torch loaded takes 0.7-0.9 s on a 2-core CPU (a third of a NePhi prediction's run); ``os._exit`` skips it.
    Every file the engine writes is closed (and its temporary folders removed) before :func:`main` returns.
    """
    signals.install()  # first: a signal from now on is a cancellation (exit 3), never a traceback or exit -15
    set_engine_environment()  # before the environment is compared with an engine server's
    from nephireg.engine_link import run_through_server

    code = run_through_server(sys.argv[1:])
    if code is None:  # no engine server (or not for this command): the run is this process's
        code = main()
    if sys.gettrace() is not None or sys.getprofile() is not None:  # coverage, cProfile: let them write at exit
        sys.exit(code)
    from nephireg.progress import flush_standard_streams

    flush_standard_streams()  # a closed pipe (``| head``) included
    os._exit(code)


if __name__ == "__main__":
    console_main()
