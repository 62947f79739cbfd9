"""A local OpenAI-compatible endpoint: ``transformers serve`` on 127.0.0.1 for the job's lifetime.

:class:`LocalServer` starts the server on a free port with a local model directory, waits until
``GET /health`` answers, and stops it on exit - also when the job fails, or is interrupted by
SIGINT/SIGTERM (a handler turns SIGTERM into an exception so the ``with`` block unwinds).
"""

from __future__ import annotations

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


class LocalServer:
    """Run ``transformers serve MODEL_DIR`` on 127.0.0.1 while the ``with`` block runs.

    Args:
        model_dir: a local model directory (the request's ``model`` must be its absolute path).
        device: ``cpu``, ``cuda``, ``auto``.
        startup_timeout_s: how long to wait for ``/health``.
        log_path: where the server's output goes (default: a temporary file).

    Attributes (inside the block): ``base_url`` (``http://127.0.0.1:PORT/v1``), ``model``.

    Raises:
        RuntimeError: the server exits or is not healthy within ``startup_timeout_s`` (its log's
            tail is in the message).
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", startup_timeout_s: float = 180.0,
                 log_path: str | os.PathLike | None = None):
        self.model = str(Path(model_dir).resolve())
        self.device, self.timeout = device, startup_timeout_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="transformers-serve-", suffix=".log")[1])
        self.port = None
        self.proc: subprocess.Popen | None = None
        self._old_term = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def __enter__(self) -> "LocalServer":
        self.port = free_port()
        cache = Path(tempfile.gettempdir(), "mmsae-hf-cache")
        cache.mkdir(exist_ok=True)
        # Offline, with an existing hub cache folder (GET /v1/models fails without one).
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": os.environ.get("HF_HUB_CACHE", str(cache))}
        cmd = [*_serve_command(), self.model, "--host", "127.0.0.1", "--port", str(self.port), "--device", self.device]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._old_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_term)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._healthy():
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"transformers serve was not healthy after {self.timeout:.0f}s:\n{self.log_tail()}")

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

    def __exit__(self, *exc) -> bool:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None
        if getattr(self, "_log", None):
            self._log.close()
        return False
