"""Process supervision with real (non-server) processes: sleep and a shell."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from cluster.processes import (
    PidFile,
    ProcessSpec,
    ServiceFailed,
    Supervisor,
    alive,
    log4j2_console,
    port_open,
)


def spec(tmp_path: Path, argv: list[str], ready: bool = True, name: str = "svc") -> ProcessSpec:
    return ProcessSpec(
        name=name,
        argv=argv,
        ports=[],
        ready=lambda: ready,
        log_file=tmp_path / f"{name}.log",
        start_timeout=2,
        stop_timeout=3,
    )


def test_launch_is_idempotent_and_stop_kills_the_whole_session(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "run")
    # A shell that leaves a grandchild behind in a subshell.
    s = spec(tmp_path, ["bash", "-c", "(sleep 300 &); sleep 300"])
    pid = sup.launch(s)
    assert sup.launch(s) == pid
    time.sleep(0.5)
    session = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and alive(int(p.name)) and os.getsid(int(p.name)) == pid
    ]
    assert len(session) >= 2
    assert sup.stop(s) is True
    assert not any(alive(p) for p in session)
    assert sup.pid(s) is None
    assert sup.stop(s) is False


def test_a_recycled_pid_is_not_taken_for_the_service(tmp_path: Path) -> None:
    pidfile = PidFile(tmp_path, "svc")
    pidfile.path.write_text(f"{os.getpid()} 1\n")  # our PID, but another start time
    assert pidfile.live_pid() is None
    pidfile.write(os.getpid())
    assert pidfile.live_pid() == os.getpid()


def test_a_service_that_exits_reports_its_log(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "run")
    s = spec(tmp_path, ["bash", "-c", "echo 'bad flag --x' >&2; exit 3"], ready=False)
    sup.launch(s)
    with pytest.raises(ServiceFailed, match="bad flag --x"):
        sup.wait_ready(s)


def test_a_service_that_never_gets_ready_times_out(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "run")
    s = spec(tmp_path, ["sleep", "30"], ready=False)
    sup.launch(s)
    try:
        with pytest.raises(ServiceFailed, match="did not become ready"):
            sup.wait_ready(s)
    finally:
        sup.stop(s)


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "run")
    s = spec(tmp_path, ["bash", "-c", "trap '' TERM; sleep 300 & wait"])
    s.stop_timeout = 0.5
    pid = sup.launch(s)
    time.sleep(0.3)
    assert sup.stop(s)
    assert not alive(pid)


def test_port_open_tells_a_listener_from_a_closed_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_open(port) is True
    assert port_open(port) is False
    assert port_open(1) is False


def test_log4j2_console_holds_each_named_logger_at_its_level() -> None:
    text = log4j2_console({"org.reflections": "ERROR", "state.change.logger": "WARN"})
    props = dict(line.split(" = ", 1) for line in text.splitlines())
    assert props["rootLogger.level"] == "INFO"
    names = [k for k in props if k.startswith("logger.") and k.endswith(".name")]
    named = {props[k]: props[k.removesuffix(".name") + ".level"] for k in names}
    assert named == {"org.reflections": "ERROR", "state.change.logger": "WARN"}
