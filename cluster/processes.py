"""Local server processes: start detached, remember by PID, stop by PID, see what listens.

Each service runs in a session of its own (``start_new_session``), so stopping it
signals the whole process group and then sweeps up any process left in its session.
A PID file holds the PID and the process start time, so a recycled PID is never
taken for the service.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.exceptions import RaylineError


class ServiceFailed(RaylineError):
    """A local service did not start or did not become ready."""


@dataclass
class ProcessSpec:
    """How to run one local service."""

    name: str
    argv: list[str]
    ports: list[int]
    ready: Callable[[], bool]
    log_file: Path
    user: str | None = None
    env: dict[str, str] | None = None
    cwd: Path | None = None
    stop_signal: int = signal.SIGTERM
    start_timeout: float = 90.0
    stop_timeout: float = 30.0
    extra: dict[str, str] = field(default_factory=dict)


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name); None when gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields


def alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting to be reaped has ended)."""
    return _stat_fields(pid) is not None


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return None if fields is None else fields[19]  # field 22: starttime


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is not None and int(fields[3]) == sid:  # field 6: session id
            members.append(int(entry.name))
    return members


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class PidFile:
    """``<run dir>/<name>.pid`` holding "PID STARTTIME"."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.path = run_dir / f"{name}.pid"

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{pid} {_start_time(pid) or ''}\n")

    def live_pid(self) -> int | None:
        """The PID when that very process is still running, else None."""
        try:
            pid_text, _, started = self.path.read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        current = _start_time(pid)
        if current is None or (started and current != started):
            return None
        return pid

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# Services started by this process, by PID, for as long as the process lives: they
# outlive any one Supervisor, and are reaped when they stop (a long-lived
# `rayline demo` would otherwise keep zombies).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class Supervisor:
    """Starts and stops the processes of the local stack."""

    def __init__(self, run_dir: Path) -> None:
        self._run_dir = run_dir

    def pid(self, spec: ProcessSpec) -> int | None:
        for child in list(_CHILDREN.values()):
            child.poll()  # reap a child that exited
        return PidFile(self._run_dir, spec.name).live_pid()

    def launch(self, spec: ProcessSpec) -> int:
        """Start ``spec`` unless it runs already; return its PID without waiting."""
        existing = self.pid(spec)
        if existing is not None:
            return existing
        busy = [p for p in spec.ports if port_open(p)]
        if busy:
            raise ServiceFailed(
                f"{spec.name}: port {busy[0]} is taken by another program; stop it or set a "
                f"different port (see `rayline config`)"
            )
        spec.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(spec.env or {})}
        with open(spec.log_file, "ab") as log:
            proc = subprocess.Popen(
                spec.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
                cwd=spec.cwd,
                user=spec.user,
                group=spec.user,
            )
        _CHILDREN[proc.pid] = proc
        PidFile(self._run_dir, spec.name).write(proc.pid)
        return proc.pid

    def wait_ready(self, spec: ProcessSpec) -> None:
        deadline = time.monotonic() + spec.start_timeout
        while time.monotonic() < deadline:
            if self.pid(spec) is None:
                raise ServiceFailed(
                    f"{spec.name} exited during start; last lines of {spec.log_file}:\n"
                    + tail(spec.log_file)
                )
            if spec.ready():
                return
            time.sleep(0.25)
        raise ServiceFailed(
            f"{spec.name} did not become ready within {spec.start_timeout:.0f} s; "
            f"see {spec.log_file}:\n" + tail(spec.log_file)
        )

    def stop(self, spec: ProcessSpec) -> bool:
        """Stop the service and everything in its session; True when one was running."""
        pidfile = PidFile(self._run_dir, spec.name)
        pid = pidfile.live_pid()
        if pid is None:
            pidfile.remove()
            return False
        _signal_group(pid, spec.stop_signal)
        deadline = time.monotonic() + spec.stop_timeout
        while time.monotonic() < deadline and _session_members(pid):
            time.sleep(0.2)
        for member in _session_members(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        while _session_members(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.1)
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.wait(timeout=5)
        pidfile.remove()
        return True


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def log4j2_console(levels: dict[str, str]) -> str:
    """A log4j2 configuration for a local JVM service: INFO to the console (its log
    file), with the named loggers held at the given levels."""
    lines = [
        "status = warn",
        "appender.out.type = Console",
        "appender.out.name = OUT",
        "appender.out.layout.type = PatternLayout",
        "appender.out.layout.pattern = [%d] %p %m (%c)%n",
        "rootLogger.level = INFO",
        "rootLogger.appenderRef.out.ref = OUT",
    ]
    for n, (logger, level) in enumerate(sorted(levels.items())):
        lines += [f"logger.l{n}.name = {logger}", f"logger.l{n}.level = {level}"]
    return "\n".join(lines) + "\n"
