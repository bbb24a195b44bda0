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
identity}`` with the client's standard input, output and error attached (SCM_RIGHTS), then ``signal``
``{signum}`` for each SIGINT/SIGTERM the client receives. Server -> client: ``refused`` ``{reason}``, or
``started`` ``{pid}`` then ``exit`` ``{code}`` (negative: the signal that killed the run). A client that goes away
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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

SERVER_ENV = "NEPHIREG_SERVER"
"""Environment variable: the engine server's socket path, or ``off`` (never use a server)."""

NO_SERVER_FLAG = "--no-server"
LOAD_TIME_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "PYTORCH_", "TORCH_", "CUDA_", "NVIDIA_",
                      "LD_", "PYTHON")
"""Environment variables read when the interpreter, torch or its thread libraries load: a fork keeps the server's,
so a client whose values differ runs in its own process."""

MAX_LINE_BYTES = 1 << 20  # a request is a command line and an environment: far below this
_STREAMS = (0, 1, 2)


class LinkError(Exception):
    """A message that is not one of the protocol's (the other side is not a NePhi engine server or client)."""


def default_socket_path() -> str:
    """``$XDG_RUNTIME_DIR/nephireg/engine.sock`` where that folder exists (a per-user, private runtime folder),
    else ``<temp folder>/nephireg-<uid>/engine.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "nephireg", "engine.sock")
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"nephireg-{os.getuid()}", "engine.sock")


def socket_path() -> Optional[str]:
    """The server socket this process would use (None: ``NEPHIREG_SERVER=off``, or no Unix sockets here)."""
    if not hasattr(socket, "AF_UNIX") or not hasattr(socket, "send_fds"):
        return None
    chosen = os.environ.get(SERVER_ENV, "").strip()
    if chosen.lower() == "off":
        return None
    return os.path.abspath(chosen) if chosen else default_socket_path()


def identity() -> Dict[str, str]:
    """What makes two processes the same engine: its version, interpreter and package folder."""
    import nephireg

    return {"version": nephireg.__version__, "python": os.path.realpath(sys.executable),
            "package": os.path.realpath(os.path.dirname(nephireg.__file__))}


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
    """Whether this command line may run in a server: ``register`` without ``--no-server``."""
    return bool(argv) and argv[0] == "register" and NO_SERVER_FLAG not in argv


def run_through_server(argv: Sequence[str]) -> Optional[int]:
    """Run the command line ``argv`` in the engine server and return its exit code; None when no server can take
    it (the caller then runs it itself). Signals recorded by :mod:`nephireg.signals` before the run started go to
    the run; later ones are forwarded as they come."""
    path = socket_path() if wants_server(argv) else None
    if path is None:
        return None
    sock = _connect(path)
    if sock is None:
        return None
    with sock:
        return _run(sock, path, argv)


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
        sock.connect(path)
        if peer_uid(sock) != os.getuid():
            raise ConnectionRefusedError
    except OSError:  # a socket left by a server that has gone, or one that is full
        sock.close()
        return None
    return sock


def _run(sock: socket.socket, path: str, argv: Sequence[str]) -> Optional[int]:

    env = dict(os.environ)
    request = {"kind": "run", "argv": list(argv), "cwd": os.getcwd(), "env": env, "identity": identity()}
    reader = LineReader(sock)
    try:
        send_message(sock, request, _STREAMS)
        reply = reader.receive()
    except (OSError, LinkError) as exc:  # e.g. a standard stream closed here (EBADF): it cannot be handed over
        reply = {"kind": "refused", "reason": f"{type(exc).__name__}: {exc}"}
    if reply is None or reply.get("kind") != "started":
        reason = reply.get("reason") if reply else "it closed the connection"
        _say(f"nephireg: the engine server at {path} was not used ({reason}); running here")
        return None
    return _wait(sock, reader)


def _wait(sock: socket.socket, reader: LineReader) -> int:
    """Forward SIGINT/SIGTERM (the last one recorded before, and any that come) until the run's exit code arrives."""
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
                _say("nephireg: the engine server stopped during the run (its run was cancelled)")
                return 3  # protocol.ExitCode.CANCELLED (not imported: it is the only code needed here)
            if message.get("kind") == "exit" and isinstance(message.get("code"), int):
                return _exit_code(message["code"])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for fd in reader.fds:
            os.close(fd)


def _exit_code(code: int) -> int:
    """A run that a signal killed (negative code) ends this process by the same signal, as a run here would end."""
    if code >= 0:
        return code
    signal.signal(-code, signal.SIG_DFL)
    sys.stdout.flush()
    os.kill(os.getpid(), -code)
    return 128 - code  # where the signal does not end the process (it is blocked)


def _say(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def split_request(message: Mapping[str, Any]) -> Tuple[List[str], str, Dict[str, str], Dict[str, str]]:
    """``argv``, ``cwd``, ``env`` and ``identity`` of a ``run`` message; :class:`LinkError` when one is missing or
    of the wrong type."""
    argv, cwd, env, ident = (message.get(key) for key in ("argv", "cwd", "env", "identity"))
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and isinstance(cwd, str)
            and isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            and isinstance(ident, dict)):
        raise LinkError("a run message without argv, cwd, env and identity")
    return argv, cwd, env, ident
