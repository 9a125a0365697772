"""Start, health-wait and stop a group of server processes, leaving no orphans.

Each server runs in a session (and process group) of its own, with its own log file and port.
Start-up waits for ``GET /health`` to answer 200; a server that exits first, or does not answer
within the timeout, fails the start with its log tail quoted, and every server is stopped.

Stopping sends SIGTERM to each process group (and to any descendant that left its group), waits,
then SIGKILLs what is left. It runs on normal exit, on any error, on Ctrl-C (KeyboardInterrupt)
and on SIGTERM/SIGHUP (turned into :class:`Terminated`, a ``SystemExit``) while the group is
entered as a context manager in the main thread, and from ``atexit`` as a last resort. Each
child also gets ``PR_SET_PDEATHSIG=SIGTERM`` so that a launcher killed with SIGKILL still
takes its servers down.

Only processes this module started (and their descendants) are ever signalled.
"""
from __future__ import annotations

import atexit
import ctypes
import errno
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, TypeVar

from servers.launcher.errors import LayoutError, ServerDiedError, ServerStartError

LOG_TAIL_LINES = 30


_Self = TypeVar("_Self", bound="StopsOnExit")


class Terminated(SystemExit):
    """Raised in the main thread when the launcher gets SIGTERM or SIGHUP (exit code 128+sig)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class StopsOnExit:
    """A set of servers that stops, by any path out of its ``with`` block: an error while
    starting, the block's end, or SIGTERM/SIGHUP turned into :class:`Terminated` in the main
    thread (so ``finally`` blocks run). One host's :class:`ServerGroup` and the Ray driver's
    ``RayCluster`` share it; each brings ``start``, ``stop``, ``handle_signals`` and
    ``_stopping``."""

    handle_signals: bool
    _stopping: bool
    _old_handlers: dict[int, object]

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self: _Self) -> _Self:
        self._install_signal_handlers()
        try:
            self.start()
        except BaseException:
            self.stop()
            self._restore_signal_handlers()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._stopping:
            return  # already stopping: finish that first
        raise Terminated(signum)


@dataclass
class ProcessSpec:
    """How to start one server: its command, extra environment, port and log file."""

    name: str
    argv: list[str]
    port: int
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    health_path: str = "/health"
    cpus: tuple[int, ...] = ()
    cwd: str | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


# -- ports ---------------------------------------------------------------------------------------


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could not bind ``host:port`` now (something listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


class PortClaim(Protocol):
    """What :func:`check_ports` reads of a server: a :class:`ProcessSpec` or a plan's server."""

    @property
    def name(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def host(self) -> str: ...


def check_ports(specs: Iterable[PortClaim]) -> None:
    seen: dict[int, str] = {}
    for s in specs:
        if s.port in seen:
            raise LayoutError(f"port {s.port} is given to both {seen[s.port]} and {s.name}")
        seen[s.port] = s.name
        if port_in_use(s.port, s.host):
            raise LayoutError(f"port {s.port} on {s.host} (for {s.name}) is in use: stop what "
                              "holds it or pick another --base-port")


# -- /proc helpers (Linux) -------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) for every live process."""
    table: dict[int, tuple[int, int, str]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read().decode(errors="replace")
        except OSError:
            continue
        # comm may hold spaces and parentheses: split after the last ')'.
        rest = data[data.rfind(")") + 2:].split()
        if len(rest) < 3:
            continue
        table[int(name)] = (int(rest[1]), int(rest[2]), rest[0])
    return table


def group_members(pgid: int, table: dict[int, tuple[int, int, str]] | None = None) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    if table is None:
        table = _proc_table()
    if not table and not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    return sorted(p for p, (_, g, st) in table.items() if g == pgid and st not in ("Z", "X"))


def descendants(pid: int, table: dict[int, tuple[int, int, str]] | None = None) -> list[int]:
    """Live descendants of ``pid`` (children, their children, ...)."""
    if table is None:
        table = _proc_table()
    kids: dict[int, list[int]] = {}
    for p, (pp, _, st) in table.items():
        if st not in ("Z", "X"):
            kids.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return sorted(out)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
        return data[data.rfind(")") + 2:].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


# -- one server ----------------------------------------------------------------------------------

_PRCTL: Callable[..., int] | None
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _PRCTL = _LIBC.prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None
_PR_SET_PDEATHSIG = 1


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


def _make_preexec(cpus: Sequence[int], sigmask: Iterable[int] | None = None) -> Callable[[], None]:
    cpu_set = set(cpus)

    def preexec() -> None:  # runs in the child between fork and exec: syscalls only
        if sigmask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)  # as the parent had it
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if cpu_set:
            try:
                os.sched_setaffinity(0, cpu_set)
            except OSError:
                pass

    return preexec


class ManagedServer:
    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self._log: BinaryIO | None = None
        self.tracked: set[int] = set()  # every descendant pid seen, to stop escapees too

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self) -> None:
        spec = self.spec
        os.makedirs(os.path.dirname(os.path.abspath(spec.log_path)), exist_ok=True)
        self._log = open(spec.log_path, "ab", buffering=0)
        env = dict(os.environ)
        env.update(spec.env)
        self._log.write(
            f"=== harness: starting {spec.name} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{' '.join(spec.argv)}\n".encode())
        # Block stop signals while the child is forked, so a Ctrl-C or SIGTERM cannot land
        # between fork and `self.popen = ...` (a server nobody would stop). The child gets the
        # old mask back before exec; a pending signal is delivered here right after.
        old_mask = None
        if threading.current_thread() is threading.main_thread():
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            self.popen = subprocess.Popen(
                spec.argv, env=env, cwd=spec.cwd, stdin=subprocess.DEVNULL,
                stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_make_preexec(spec.cpus, old_mask), close_fds=True,
            )
        except OSError as exc:
            self._log.close()
            raise ServerStartError(f"{spec.name}: cannot start {spec.argv[0]}: {exc.strerror}",
                                   name=spec.name, log_path=spec.log_path) from None
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.started_at = time.monotonic()

    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def healthy(self, timeout: float = 2.0) -> bool:
        url = self.spec.base_url + self.spec.health_path
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                status: int = resp.status
                return status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.spec.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 64 * 1024))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def remember_descendants(self, table: dict[int, tuple[int, int, str]] | None = None) -> None:
        if self.popen is not None:
            self.tracked.update(descendants(self.popen.pid, table))

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _cause(tail: str) -> str:
    """The most telling line of a log tail: the last one naming an error."""
    for line in reversed(tail.splitlines()):
        s = line.strip()
        if any(k in s for k in ("Error", "error:", "Exception", "CUDA out of memory", "Killed")):
            return s[:300]
    return ""


def _quote(tail: str) -> str:
    return "\n".join("  | " + ln for ln in tail.splitlines()) if tail else "  | (log is empty)"


# -- a group of servers -------------------------------------------------------------------------


class ServerGroup(StopsOnExit):
    """Servers that start together and stop together.

    ``with ServerGroup(specs) as group:`` starts every server and waits for each to be healthy;
    leaving the block, by any path, stops them all.
    """

    def __init__(self, specs: Sequence[ProcessSpec], *, health_timeout: float = 600.0,
                 stop_timeout: float = 20.0, poll_interval: float = 0.5,
                 handle_signals: bool = True,
                 on_progress: Callable[[str], None] | None = None) -> None:
        self.servers = [ManagedServer(s) for s in specs]
        self.health_timeout = health_timeout
        self.stop_timeout = stop_timeout
        self.poll_interval = poll_interval
        self.handle_signals = handle_signals
        self.on_progress = on_progress or (lambda msg: None)
        self._old_handlers: dict[int, object] = {}
        self._stopping = False
        self._stopped = False
        self._atexit_registered = False
        self._lock = threading.Lock()

    # start ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every server and wait until all answer /health; on failure stop all and raise."""
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        check_ports(s.spec for s in self.servers)
        for srv in self.servers:
            if port_in_use(srv.spec.port, srv.spec.host):  # taken since the check above
                raise LayoutError(f"port {srv.spec.port} on {srv.spec.host} (for {srv.name}) "
                                  "is in use: stop what holds it or pick another --base-port")
            srv.start()
            self.on_progress(f"started {srv.name} (pid {srv.pid}, port {srv.spec.port}, "
                             f"log {srv.spec.log_path})")
        self.wait_healthy()

    def wait_healthy(self) -> None:
        pending = list(self.servers)
        while pending:
            table = _proc_table()
            for srv in list(pending):
                srv.remember_descendants(table)
                code = srv.exited()
                if code is not None:
                    tail = srv.log_tail()
                    cause = _cause(tail)
                    raise ServerStartError(
                        f"{srv.name} exited with code {code} during start-up"
                        + (f": {cause}" if cause else "")
                        + f"\nlast lines of {srv.spec.log_path}:\n{_quote(tail)}",
                        name=srv.name, log_path=srv.spec.log_path, log_tail=tail)
                if srv.healthy():
                    srv.ready_at = time.monotonic()
                    pending.remove(srv)
                    self.on_progress(f"{srv.name} is healthy after "
                                     f"{srv.ready_at - (srv.started_at or srv.ready_at):.1f} s "
                                     f"at {srv.spec.base_url}")
                    continue
                waited = time.monotonic() - (srv.started_at or time.monotonic())
                if waited > self.health_timeout:
                    tail = srv.log_tail()
                    raise ServerStartError(
                        f"{srv.name} did not answer {srv.spec.health_path} on port "
                        f"{srv.spec.port} within {self.health_timeout:g} s (still running; "
                        "raise --health-timeout if the model is large)"
                        + f"\nlast lines of {srv.spec.log_path}:\n{_quote(tail)}",
                        name=srv.name, log_path=srv.spec.log_path, log_tail=tail)
            if pending:
                time.sleep(self.poll_interval)

    # running --------------------------------------------------------------------------------
    def check_alive(self) -> None:
        """Raise :class:`ServerDiedError` if a started server has exited."""
        for srv in self.servers:
            code = srv.exited()
            if code is not None and not self._stopping:
                tail = srv.log_tail()
                raise ServerDiedError(
                    f"{srv.name} (pid {srv.pid}) exited with code {code} while serving"
                    + (f": {_cause(tail)}" if _cause(tail) else "")
                    + f"\nlast lines of {srv.spec.log_path}:\n{_quote(tail)}")

    def wait(self, poll_interval: float = 1.0) -> None:
        """Block until a server dies (raises) or a signal/Ctrl-C interrupts."""
        while True:
            self.check_alive()
            table = _proc_table()
            for srv in self.servers:
                srv.remember_descendants(table)
            time.sleep(poll_interval)

    # stop -----------------------------------------------------------------------------------
    def stop(self) -> list[str]:
        """Stop every server: SIGTERM to each process group, then SIGKILL after ``stop_timeout``.

        Idempotent. Returns one line per server saying how it ended.
        """
        with self._lock:
            if self._stopped:
                return []
            self._stopping = True
        report: list[str] = []
        in_main = threading.current_thread() is threading.main_thread()
        old_int = None
        if in_main:
            # A second Ctrl-C must not cut the clean-up short.
            try:
                old_int = signal.signal(signal.SIGINT, lambda s, f: None)
            except ValueError:
                old_int = None
        try:
            report = self._stop_all()
        finally:
            if in_main and old_int is not None:
                signal.signal(signal.SIGINT, old_int)
            self._stopped = True
            if self._atexit_registered:
                atexit.unregister(self.stop)
                self._atexit_registered = False
        return report

    def _targets(self) -> tuple[dict[ManagedServer, int], dict[ManagedServer, set[int]]]:
        table = _proc_table()
        groups: dict[ManagedServer, int] = {}
        loose: dict[ManagedServer, set[int]] = {}
        for srv in self.servers:
            if srv.popen is None:
                continue
            srv.remember_descendants(table)
            pgid = srv.popen.pid  # start_new_session: the leader's pid is the group id
            groups[srv] = pgid
            loose[srv] = {p for p in srv.tracked
                          if p in table and table[p][1] != pgid and _alive(p)}
        return groups, loose

    def _signal_all(self, sig: int, groups: dict[ManagedServer, int],
                    loose: dict[ManagedServer, set[int]]) -> None:
        for srv, pgid in groups.items():
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            for p in loose.get(srv, ()):
                try:
                    os.kill(p, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def _remaining(self, groups: dict[ManagedServer, int],
                   loose: dict[ManagedServer, set[int]]) -> dict[ManagedServer, list[int]]:
        for srv in groups:
            srv.exited()  # reap the leader so it does not linger as a zombie
        table = _proc_table()
        left: dict[ManagedServer, list[int]] = {}
        for srv, pgid in groups.items():
            pids = set(group_members(pgid, table))
            pids |= {p for p in loose.get(srv, ()) if _alive(p)}
            if pids:
                left[srv] = sorted(pids)
        return left

    def _stop_all(self) -> list[str]:
        groups, loose = self._targets()
        report: list[str] = []
        if groups:
            self._signal_all(signal.SIGTERM, groups, loose)
            deadline = time.monotonic() + self.stop_timeout
            left = self._remaining(groups, loose)
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = self._remaining(groups, loose)
            if left:
                killed = {srv: pids for srv, pids in left.items()}
                for srv in killed:
                    try:
                        os.killpg(groups[srv], signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    for p in killed[srv]:
                        try:
                            os.kill(p, signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
                end = time.monotonic() + 10
                while self._remaining(groups, loose) and time.monotonic() < end:
                    time.sleep(0.05)
            else:
                killed = {}
            for srv in groups:
                try:
                    srv.popen.wait(timeout=5)  # type: ignore[union-attr]
                except subprocess.TimeoutExpired:
                    pass
                how = ("SIGKILL after SIGTERM was ignored for "
                       f"{self.stop_timeout:g} s" if srv in killed else "SIGTERM")
                report.append(f"{srv.name} (pid {srv.pid}) stopped by {how}")
        for srv in self.servers:
            srv.close_log()
        return report

    # info -----------------------------------------------------------------------------------
    def all_pids(self) -> list[int]:
        """Every live process this group started (leaders and descendants)."""
        table = _proc_table()
        out: set[int] = set()
        for srv in self.servers:
            if srv.popen is None:
                continue
            out |= set(group_members(srv.popen.pid, table))
            out |= {p for p in srv.tracked if p in table and _alive(p)}
            out |= set(descendants(srv.popen.pid, table))
        return sorted(out)
