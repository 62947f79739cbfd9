"""Helpers for the ``workflow_scripts/`` entry points: logging that keeps tracebacks, and the
run-time (non-result) settings. The code hash each rule carries in its params is
:mod:`mmsae.workflow.script_hash` (the Snakefile's, not the jobs')."""

from __future__ import annotations

import logging
import sys

from mmsae.core.gpu import lease


_LEASE = None


def setup(log_path: str | None, threads: int = 1, gpus: int = 0) -> logging.Logger:
    """Log to ``log_path`` and stderr at INFO, give torch ``threads`` CPU threads, and lease ``gpus``
    devices for the rest of the process (see :mod:`mmsae.core.gpu`; a no-op without GPUs).

    An uncaught exception is written with its traceback to the log (the file Snakemake names when
    the job fails) before the process exits non-zero.
    """
    global _LEASE
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True)
    log = logging.getLogger("mmsae")

    def log_uncaught(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        log.critical("job failed", exc_info=(kind, value, tb))  # the handlers reach stderr and the log file
        logging.shutdown()

    sys.excepthook = log_uncaught
    try:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    except ImportError:
        pass
    if gpus and _LEASE is None:
        _LEASE = lease(int(gpus))
        _LEASE.__enter__()  # released when the process ends, however it ends
    return log


RUNTIME_ENDPOINT_KEYS = ("api_key_env", "concurrency", "timeout_s", "retries")


def endpoint_runtime(explain: dict, refiner: dict | None = None) -> dict:
    """The endpoint settings that do not change an answer (throughput, patience, where the key is):
    read by the scripts at run time instead of passed as ``params``, so editing them reruns nothing.

    Args:
        explain: the ``explain`` config section.
        refiner: the ``evaluate.refiner`` section; its non-null ``api_key_env`` wins.
    """
    out = {k: explain[k] for k in RUNTIME_ENDPOINT_KEYS}
    if refiner and refiner.get("api_key_env") is not None:
        out["api_key_env"] = refiner["api_key_env"]
    return out
