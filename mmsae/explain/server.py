"""A local OpenAI-compatible endpoint: ``transformers serve`` on 127.0.0.1 for the job's lifetime.

:class:`LocalServer` starts the server on a free port with a local model directory, waits until
``GET /health`` answers, and stops it on exit - also when the job fails, or is interrupted by
SIGINT/SIGTERM (a handler turns SIGTERM into an exception so the ``with`` block unwinds).

The server never outlives its job, also when the job dies without unwinding (``kill -9``, the OOM
killer, an executor ending the job):

* on Linux the server is started with ``PR_SET_PDEATHSIG`` = SIGKILL (``prctl(2)``), so the kernel
  kills it when the thread that started it (the job's main thread) ends;
* each running server has a record ``<pid_dir>/server-<pid>.json`` (host, boot id, the server's and
  the job's PID and start time); every :meth:`LocalServer.start` first removes the servers whose job
  is gone (:func:`reap_orphans`). Start times (``/proc/PID/stat``) make sure a reused PID is never
  taken for the recorded process; records of another host or boot are left alone.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command() -> list[str]:
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        raise FileNotFoundError("the 'transformers' command is missing: pip install 'transformers[serving]'")
    return [exe, "serve"]


def default_pid_dir() -> Path:
    """Where server records go when no directory is given: a per-user folder in the temp dir."""
    return Path(tempfile.gettempdir(), f"mmsae-servers-{os.getuid()}")


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22),
    or None when there is no such process (or no ``/proc``). A zombie counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _die_with_parent(parent: int):
    """``preexec_fn`` for the server: SIGKILL when the parent thread ends (Linux), and exit at once
    when the parent is already gone (it died between fork and ``prctl``)."""
    def preexec():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            return  # not Linux: the records (reap_orphans) still clean up at the next start
        if os.getppid() != parent:
            os._exit(1)
    return preexec


def reap_orphans(pid_dir: str | os.PathLike) -> list[int]:
    """Kill the servers recorded in ``pid_dir`` whose job is gone, and drop stale records.

    A record is acted on only when it is of this host and boot. Its server is killed (SIGKILL) only
    when the recorded job process is gone (no process with that PID and start time) and the server
    process is still the recorded one (same PID and start time). Unreadable records are removed.

    Returns:
        The PIDs of the servers killed.
    """
    killed = []
    host, boot = socket.gethostname(), _boot_id()
    for path in sorted(Path(pid_dir).glob("server-*.json")):
        try:
            rec = json.loads(path.read_text())
            mine = rec["host"] == host and rec["boot_id"] == boot
            parent_alive = process_start_time(rec["parent_pid"]) == rec["parent_start"]
            server_alive = process_start_time(rec["pid"]) == rec["start"]
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if not mine or parent_alive:
            continue
        if server_alive:
            log.warning("killing server %d (%s) left behind by job %d", rec["pid"], rec.get("model"), rec["parent_pid"])
            try:
                os.kill(rec["pid"], signal.SIGKILL)
                killed.append(rec["pid"])
            except ProcessLookupError:
                pass
        path.unlink(missing_ok=True)
    return killed


class LocalServer:
    """Run ``transformers serve MODEL_DIR`` on 127.0.0.1 while the ``with`` block runs (or from
    :meth:`start` to :meth:`stop`); the server dies with the process that started it.

    Args:
        model_dir: a local model directory (the request's ``model`` must be its absolute path).
        device: ``cpu``, ``cuda``, ``auto``.
        startup_timeout_s: how long to wait for ``/health``.
        log_path: where the server's output goes (default: a temporary file).
        pid_dir: where the record of the running server goes (default :func:`default_pid_dir`).
        command: the program to run instead of ``transformers serve`` (tests); it is given
            ``MODEL_DIR --host H --port P --device D`` and must answer ``GET /health``.

    Attributes (once started): ``base_url`` (``http://127.0.0.1:PORT/v1``), ``model``, ``proc``.

    Raises:
        RuntimeError: the server exits or is not healthy within ``startup_timeout_s`` (its log's
            tail is in the message).
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", startup_timeout_s: float = 180.0,
                 log_path: str | os.PathLike | None = None, pid_dir: str | os.PathLike | None = None,
                 command: list[str] | None = None):
        self.model = str(Path(model_dir).resolve())
        self.device, self.timeout = device, startup_timeout_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="transformers-serve-", suffix=".log")[1])
        self.pid_dir = Path(pid_dir) if pid_dir else default_pid_dir()
        self.command = command
        self.port = None
        self.proc: subprocess.Popen | None = None
        self._old_term = None
        self._record: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has been called."""
        return self.proc is not None

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> str:
        """Start the server (once; later calls return at once) and wait until it is healthy.

        Returns:
            ``base_url``.
        """
        if self.proc is not None:
            return self.base_url
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        reap_orphans(self.pid_dir)
        self.port = free_port()
        cache = Path(tempfile.gettempdir(), "mmsae-hf-cache")
        cache.mkdir(exist_ok=True)
        # Offline, with an existing hub cache folder (GET /v1/models fails without one).
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": os.environ.get("HF_HUB_CACHE", str(cache))}
        cmd = [*(self.command or _serve_command()), self.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--device", self.device]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent(os.getpid()))
        self._write_record()
        self._old_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_term)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"transformers serve exited with {code}:\n{self.log_tail()}")
            if self._healthy():
                log.info("local server %d on port %d serves %s", self.proc.pid, self.port, self.model)
                return self.base_url
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"transformers serve was not healthy after {self.timeout:.0f}s:\n{self.log_tail()}")

    def _write_record(self) -> None:
        rec = {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": self.proc.pid,
               "start": process_start_time(self.proc.pid), "parent_pid": os.getpid(),
               "parent_start": process_start_time(os.getpid()), "port": self.port, "model": self.model}
        self._record = self.pid_dir / f"server-{self.proc.pid}.json"
        tmp = self._record.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self._record)

    def __enter__(self) -> "LocalServer":
        self.start()
        return self

    def _on_term(self, signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def request_count(self) -> int:
        """Chat-completion requests the server has logged (its access log)."""
        return self.log_tail(10**9).count('"POST /v1/chat/completions')

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s) and drop its record; a no-op when it
        was never started. The process stays in ``proc`` (its return code readable)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._record is not None:
            self._record.unlink(missing_ok=True)
            self._record = None
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False
