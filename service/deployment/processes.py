"""Child processes for `dscguard stack up`, the service tests and the benchmarks: one way to start, watch and stop them.

- `spawn`: a command with its output appended to a log file; `log_tail` quotes the end of that log.
- `wait_for`: poll a condition until it holds, failing early (`ProcessFailed`, quoting the log) when a watched
  child exits, and at the deadline.
- `stop`: SIGTERM, a bounded wait, then SIGKILL.
- `RedisServer`: a `redis-server` on loopback, its append-only file fsynced before each reply, that can be
  killed and restarted on its files; `redis_answers`, `free_port`, `listening`.
- `resident_megabytes`, `cpu_seconds`: what a process uses, read through psutil.

>>> import sys, tempfile
>>> log = Path(tempfile.mkdtemp()) / "child.log"
>>> child = spawn([sys.executable, "-c", "print('up')"], log)
>>> wait_for(lambda: child.poll() is not None, 30, "the child to exit", interval=0.05)
True
>>> stop(child), log_tail(log)
(0, 'up')
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Self, TypeVar

import psutil
import redis

from service.deployment.redis_queue import connect

T = TypeVar("T")


class ProcessFailed(RuntimeError):
    """A watched child exited, or what was awaited did not come within its time; the message quotes the log."""


def spawn(command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
          new_session: bool = True) -> subprocess.Popen:
    """`command` with stdout and stderr appended to `log`, stdin closed.

    In a session of its own by default, so that a Ctrl-C meant for the caller does not reach the child: the
    caller stops its children itself, in its own order.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=new_session)


def log_tail(log: Path, lines: int = 20) -> str:
    """The last `lines` lines of `log` ('' when there is none)."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def _quote(log: Path | Callable[[], str] | None) -> str:
    text = log_tail(log) if isinstance(log, Path) else log() if log is not None else ""
    return f":\n{text}" if text else ""


def wait_for(condition: Callable[[], T], timeout: float, what: str, *, watch: Iterable[subprocess.Popen] = (),
             log: Path | Callable[[], str] | None = None, interval: float = 0.2) -> T:
    """Poll `condition` until it returns something truthy, and return that.

    `ProcessFailed` as soon as a process in `watch` has exited, or once `timeout` seconds have passed; its
    message quotes `log` (a file: its tail; a function: the text it returns).

    >>> wait_for(lambda: 0, 0.05, "nothing", interval=0.01, log=lambda: "the log")
    Traceback (most recent call last):
    ...
    service.deployment.processes.ProcessFailed: timed out after 0.05 s waiting for nothing:
    the log
    """
    watch = list(watch)
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for process in watch:
            if process.poll() is not None:
                command = shlex.join(map(str, process.args)) if isinstance(process.args, list) else process.args
                raise ProcessFailed(f"`{command}` exited with status {process.returncode} while waiting for {what}"
                                    + _quote(log))
        if time.monotonic() >= deadline:
            raise ProcessFailed(f"timed out after {timeout:g} s waiting for {what}" + _quote(log))
        time.sleep(interval)


def stop(process: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM `process` (if it still runs), wait up to `timeout` seconds, then SIGKILL it; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=30)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on `host`:`port` now."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether Redis at `url` answers PING within `timeout` seconds."""
    try:
        return bool(connect(url, timeout).ping())
    except redis.RedisError:
        return False


class RedisServer:
    """A `redis-server` on 127.0.0.1:`port` (a free one by default), its files and its log in `directory`.

    Persistence as recommended for production: the append-only file, fsynced before each reply
    (`appendfsync always`), so every write Redis acknowledged survives a crash of the server, and a
    `start` after `kill` comes back with them.
    """

    def __init__(self, directory: Path, port: int | None = None, appendfsync: str = "always",
                 log: Path | None = None):
        self.directory, self.appendfsync = Path(directory), appendfsync
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = log or self.directory / "redis.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start it and return once it answers; `ProcessFailed` (and nothing left running) otherwise."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = spawn(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                              "--dir", str(self.directory.resolve()), "--save", "", "--appendonly", "yes",
                              "--appendfsync", self.appendfsync], self.log)
        try:
            wait_for(lambda: redis_answers(self.url, 0.5), timeout, f"redis-server on port {self.port}",
                     watch=[self.process], log=self.log, interval=0.05)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: Redis crashes; only what its append-only file holds comes back."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is not None:
            stop(self.process, timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def resident_megabytes(pid: int) -> float | None:
    """Resident memory of a process in MiB (VmRSS), None once it is gone.

    >>> import os
    >>> resident_megabytes(os.getpid()) > 1
    True
    """
    try:
        rss = psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None
    return rss / 2**20 if rss else None  # a zombie holds no memory: it is gone


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far, None once it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system
