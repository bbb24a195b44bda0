"""The engine server's link: where its socket is, what travels over it, and the client side that
``nephireg register`` uses when a server (``nephireg serve``, :mod:`nephireg.engine_server`) is listening.

Why: every fresh ``nephireg register`` loads torch (1.5-2.5 s on a 2-core CPU, more than a NePhi prediction's own
work). A server loads it once and forks a copy of itself per run; the command then only starts a small
interpreter (no numpy, no torch: this module imports the standard library only) and hands the server its command
line, its folder, its environment and its standard streams. The run's output, progress events, result folder and
exit code are those of a run in this process: the fork runs :func:`nephireg.cli.main` on the same arguments.

When the server is used: for ``register`` only, unless ``--no-server`` is given or ``NEPHIREG_SERVER=off``; at the
socket that :data:`SERVER_ENV` names, or else :func:`default_socket_path`; only a server of this user (the socket's
owner and the peer's credentials), of this very engine (version, interpreter, package folder) and with the same
load-time environment (:func:`load_time_environment`: what torch, OpenMP and Python read when they load, which a
fork cannot change). Otherwise the command runs in its own process as always, saying why on stderr when a server
was there but could not be used.

Messages: one JSON object per line (UTF-8), in each direction. Client -> server: ``run`` ``{argv, cwd, env,
umask, process, identity}`` with the client's standard input, output and error attached (SCM_RIGHTS), then
``signal`` ``{signum}`` for each SIGINT/SIGTERM the client receives. Server -> client: ``refused`` ``{reason}``
(nothing ran: the client runs the command itself) or ``ready``; the client answers ``go`` unless it has given up
(its :data:`CLIENT_TIMEOUT_S`), and only then does the server fork: so a command runs in exactly one place. Then
``started`` ``{pid}`` and ``exit`` ``{code}`` (negative: the signal that killed the run), or ``refused`` when the
fork failed (the client then runs the command itself). A client that goes away
(killed) cancels its run: the server sends it SIGTERM. A server that goes away cancels its runs the same way
(:func:`nephireg.forked.die_with`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import sys
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

SERVER_ENV = "NEPHIREG_SERVER"
"""Environment variable: the engine server's socket path, or ``off`` (never use a server)."""

NO_SERVER_FLAG = "--no-server"
LOAD_TIME_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "PYTORCH_", "TORCH_", "CUDA_", "NVIDIA_",
                      "LD_", "PYTHON", "LC_", "LANG", "MALLOC_", "GLIBC_TUNABLES", "TZ")
"""Environment variables read when the interpreter (its streams' encoding: the locale), torch or its thread
libraries load: a fork keeps the server's, so a client whose values differ runs in its own process."""

SOCKET_NAME = "engine.sock"  # the socket's file name in its folder (the default folder's, the Slicer module's)
LOCK_NAME = "engine.lock"  # beside the socket: held (flock) by the server listening there, while it runs
MAX_SOCKET_PATH_BYTES = 103  # sun_path is 104-108 bytes (by platform), the terminating NUL included
MAX_LINE_BYTES = 1 << 20  # a request is a command line and an environment: far below this
CLIENT_TIMEOUT_S = 10.0  # connecting and the server's answer (ready or refused); the run itself is not timed
_STREAMS = (0, 1, 2)


class LinkError(Exception):
    """A message that is not one of the protocol's (the other side is not a NePhi engine server or client)."""


def refusal_line(path: str, reason: str) -> str:
    """What a client says on stderr when the server at ``path`` did not take its run (it then runs it itself)."""
    return f"nephireg: the engine server at {path} was not used ({reason}); running here"


def is_refusal_line(line: str, path: str) -> bool:
    """``line`` is :func:`refusal_line` of the server at ``path`` (the Slicer module then replaces that server)."""
    return line.startswith(f"nephireg: the engine server at {path} was not used (")


def stopped_line(path: str) -> str:
    """What a client says on stderr when the server at ``path`` went away during its run (which it cancelled: the
    client exits 3 as a cancelled command does, though nobody asked it to stop)."""
    return f"nephireg: the engine server at {path} stopped during the run (its run was cancelled)"


def is_stopped_line(line: str, path: str) -> bool:
    """``line`` is :func:`stopped_line` of the server at ``path`` (the Slicer module then reports a failure, not a
    cancel the user asked for)."""
    return line == stopped_line(path)


def default_socket_path() -> str:
    """``$XDG_RUNTIME_DIR/nephireg/engine.sock`` where that folder exists (a per-user, private runtime folder),
    else ``<temp folder>/nephireg-<uid>/engine.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "nephireg", SOCKET_NAME)
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"nephireg-{os.getuid()}", SOCKET_NAME)


def socket_path() -> Optional[str]:
    """The server socket this process would use (None: ``NEPHIREG_SERVER=off``, or no Unix sockets here)."""
    if not hasattr(socket, "AF_UNIX") or not hasattr(socket, "send_fds"):
        return None
    chosen = os.environ.get(SERVER_ENV, "").strip()
    if chosen.lower() == "off":
        return None
    return os.path.abspath(chosen) if chosen else default_socket_path()


def identity() -> Dict[str, Any]:
    """What makes two processes the same engine: its version, interpreter (prefix, flags, import path) and
    package files (their newest modification time: a server started before an edit or an update is another
    engine)."""
    import nephireg

    package = os.path.realpath(os.path.dirname(nephireg.__file__))
    return {"version": nephireg.__version__, "python": os.path.realpath(sys.executable), "prefix": sys.prefix,
            "flags": repr(sys.flags), "warnoptions": list(sys.warnoptions), "xoptions": repr(sys._xoptions),
            # sys.path[0] is the entry point's folder (the working folder for ``python -m``): not the engine's
            "path": [os.path.realpath(entry) if entry else entry for entry in sys.path[1:]], "package": package,
            "package_modified_ns": _newest_mtime_ns(package)}


def _newest_mtime_ns(folder: str) -> int:
    newest = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith((".py", ".json", ".pt")):
                try:
                    newest = max(newest, os.stat(os.path.join(root, name)).st_mtime_ns)
                except OSError:
                    pass
    return newest


def process_attributes() -> Dict[str, Any]:
    """What a fork of the server would otherwise take from the server rather than from the client: niceness,
    CPU affinity, groups, resource limits and control group. The fork takes the client's niceness when it is
    higher; the rest must be equal (or the client runs the command itself)."""
    import resource

    limits = {name: list(resource.getrlimit(getattr(resource, name)))
              for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_NOFILE",
                           "RLIMIT_NPROC", "RLIMIT_RSS", "RLIMIT_STACK") if hasattr(resource, name)}
    try:
        with open("/proc/self/cgroup") as cgroup:
            group = cgroup.read()
    except OSError:
        group = ""
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return {"nice": os.nice(0), "affinity": affinity, "groups": sorted(os.getgroups()), "rlimits": limits,
            "cgroup": group}


def load_time_environment(env: Mapping[str, str]) -> Dict[str, str]:
    """The part of ``env`` that a fork of a loaded engine cannot change (:data:`LOAD_TIME_PREFIXES`)."""
    return {key: value for key, value in env.items() if key.startswith(LOAD_TIME_PREFIXES)}


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a connected Unix socket (Linux ``SO_PEERCRED``)."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


def send_message(sock: socket.socket, message: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    """One message (a JSON line); ``fds`` travel with its first bytes."""
    data = (json.dumps(message) + "\n").encode("utf-8")
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


class LineReader:
    """Reads the messages of one connection, with the descriptors that came with them."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self.fds: List[int] = []  # every descriptor received so far; the caller owns (and closes) them

    def receive(self) -> Optional[Dict[str, Any]]:
        """The next message; None at the end of the connection. Blocks (or raises BlockingIOError / TimeoutError as
        the socket is set). :class:`LinkError` for a line that is not a JSON object or is too long."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE_BYTES:
                raise LinkError("a message longer than the protocol allows")
            data, fds, _, _ = socket.recv_fds(self._sock, 65536, 8)
            self.fds.extend(fds)
            if not data:
                return None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line.decode("utf-8"))
        except ValueError as exc:
            raise LinkError(f"not a protocol message: {line[:80]!r}") from exc
        if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
            raise LinkError(f"not a protocol message: {line[:80]!r}")
        return message


def wants_server(argv: Sequence[str]) -> bool:
    """Whether this command line may run in a server: ``register`` without ``--no-server`` (or an abbreviation
    of it that argparse takes: ``--no-s`` on)."""
    return bool(argv) and argv[0] == "register" and not any(
        len(arg) >= 6 and NO_SERVER_FLAG.startswith(arg) for arg in argv)


def run_through_server(argv: Sequence[str]) -> Optional[int]:
    """Run the command line ``argv`` in the engine server and return its exit code; None when no server took it
    (the caller then runs it itself: whatever went wrong before this client said ``go``, nothing ran).
    Signals recorded by :mod:`nephireg.signals` before the run started go to the run; later ones are forwarded as
    they come."""
    try:
        path = socket_path() if wants_server(argv) and _standard_streams_open() else None
        sock = _connect(path) if path is not None else None
    except Exception:  # noqa: BLE001 - e.g. no usable temp folder for the default path: run here
        return None
    if sock is None:
        return None
    with sock:
        if sock.fileno() < 3:  # a standard stream was closed after all: it would be the run's connection
            return None
        reader = LineReader(sock)
        try:
            reply = _ask(sock, reader, argv)
        except Exception as exc:  # noqa: BLE001 - e.g. a folder that no longer exists: nothing ran
            reply = {"kind": "refused", "reason": f"{type(exc).__name__}: {exc}"}
        if reply is None or reply.get("kind") != "ready":
            reason = reply.get("reason") if reply else "it closed the connection"
            _say(refusal_line(path, reason))
            return None
        try:
            send_message(sock, {"kind": "go"})  # from here on the run is the server's: never run here as well
        except OSError as exc:  # the server has gone before the fork: nothing ran
            _say(refusal_line(path, str(exc)))
            return None
        sock.settimeout(None)  # the run takes as long as it takes
        code = _wait(sock, reader, path)
        if code is None:
            _say(f"nephireg: the engine server at {path} could not start the run; running here")
        return code


def _standard_streams_open() -> bool:
    try:
        for fd in _STREAMS:
            os.fstat(fd)
    except OSError:
        return False
    return True


def _connect(path: str) -> Optional[socket.socket]:
    """A connection to the server at ``path``; None when none of this user's listens there."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CLIENT_TIMEOUT_S)
        sock.connect(path)
        if peer_uid(sock) != os.getuid():
            raise ConnectionRefusedError
    except OSError:  # a socket left by a server that has gone, or one that is full
        sock.close()
        return None
    return sock


def _ask(sock: socket.socket, reader: LineReader, argv: Sequence[str]) -> Optional[Dict[str, Any]]:
    """Send the run request; the server's answer (``ready`` or ``refused``), None when it closed without one."""
    umask = os.umask(0o022)
    os.umask(umask)  # only read: the run's files get this process's permissions
    request = {"kind": "run", "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
               "process": process_attributes(), "identity": identity()}
    send_message(sock, request, _STREAMS)
    return reader.receive()


def _wait(sock: socket.socket, reader: LineReader, path: str) -> Optional[int]:
    """Forward SIGINT/SIGTERM (the last one recorded before, and any that come) until the run's exit code arrives;
    None when the server could not fork the run (nothing ran)."""
    from nephireg import signals

    def forward(signum: int, frame: Any = None) -> None:  # noqa: ARG001 - signal handler signature
        try:
            send_message(sock, {"kind": "signal", "signum": int(signum)})
        except OSError:  # the server has gone: its runs are being cancelled anyway
            pass

    previous = {s: signal.signal(s, forward) for s in signals.SIGNALS}
    try:
        earlier = signals.recorded()  # after the handlers: none is lost between the two (one twice is harmless)
        if earlier:
            forward(earlier[-1])
        while True:
            try:
                message = reader.receive()
            except (OSError, LinkError):
                message = None
            if message is None:
                _say(stopped_line(path))
                return 3  # protocol.ExitCode.CANCELLED (not imported: it is the only code needed here)
            if message.get("kind") == "exit" and isinstance(message.get("code"), int):
                return _exit_code(message["code"])
            if message.get("kind") == "refused":  # after go: the fork failed (no memory or process slot)
                return None  # nothing ran
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for fd in reader.fds:
            os.close(fd)


def _exit_code(code: int) -> int:
    """A run that a signal killed (negative code) ends this process by the same signal, as a run here would end."""
    if code >= 0:
        return code
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught: nothing to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    except (OSError, ValueError):  # not a signal this process can send itself
        pass
    return 128 - code  # where the signal does not end the process (it is blocked or ignored)


def _say(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class RunRequest(NamedTuple):
    """What a ``run`` message asks for: the command line, the client's folder, environment, umask and process
    attributes (:func:`process_attributes`), and which engine it is (:func:`identity`)."""

    argv: List[str]
    cwd: str
    env: Dict[str, str]
    umask: int
    process: Dict[str, Any]
    identity: Dict[str, Any]


def split_request(message: Mapping[str, Any]) -> RunRequest:
    """The :class:`RunRequest` of a ``run`` message; :class:`LinkError` when a part is missing or of the wrong
    type."""
    keys = ("argv", "cwd", "env", "umask", "process", "identity")
    argv, cwd, env, umask, process, ident = (message.get(key) for key in keys)
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and isinstance(cwd, str)
            and isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            and isinstance(umask, int) and 0 <= umask <= 0o777 and isinstance(process, dict)
            and isinstance(process.get("nice"), int) and isinstance(ident, dict)):
        raise LinkError(f"a run message without {', '.join(keys)}")
    return RunRequest(argv, cwd, env, umask, process, ident)
