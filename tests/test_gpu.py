"""GPU leases, simulated with MMSAE_NUM_GPUS on a CPU machine."""

import json
import os
import subprocess
import sys
import time

import pytest

from mmsae.core.gpu import lease, visible_devices
from mmsae.core.locks import release, try_hold

CHILD = """
import json, os, sys, time
from mmsae.core.gpu import lease
n, hold, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
with lease(n, poll_s=0.02) as ids:
    t0 = time.time()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(ids)
    time.sleep(hold)
    json.dump({"ids": ids, "start": t0, "end": time.time()}, open(out, "w"))
if sys.argv[4:] == ["fail"]:
    raise SystemExit(3)
"""


@pytest.fixture()
def eight(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("MMSAE_NUM_GPUS", "8")
    monkeypatch.setenv("MMSAE_GPU_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path


def test_jobs_get_disjoint_devices(eight):
    asks = [1, 1, 2, 2, 1, 1, 2, 1, 2, 1]  # 14 GPUs asked for in all, 8 exist
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(n), "0.4", str(eight / f"{i}.json")], env=os.environ.copy())
             for i, n in enumerate(asks)]
    assert [p.wait(timeout=60) for p in procs] == [0] * len(asks)
    got = [json.loads((eight / f"{i}.json").read_text()) for i in range(len(asks))]
    assert [len(g["ids"]) for g in got] == asks
    for i, a in enumerate(got):
        for b in got[i + 1:]:
            if a["start"] < b["end"] and b["start"] < a["end"]:  # held at the same time
                assert not set(a["ids"]) & set(b["ids"])
    assert max(int(d) for g in got for d in g["ids"]) <= 7


def test_lease_is_released_when_a_job_fails(eight):
    p = subprocess.run([sys.executable, "-c", CHILD, "8", "0", str(eight / "a.json"), "fail"], env=os.environ.copy())
    assert p.returncode == 3
    t0 = time.monotonic()
    with lease(8, poll_s=0.01) as ids:
        assert ids == [str(i) for i in range(8)]
    assert time.monotonic() - t0 < 2


def test_visible_devices_and_errors(monkeypatch, eight):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_devices() == ["3", "5"]
    with lease(1) as ids:
        assert ids in (["3"], ["5"]) and os.environ["CUDA_VISIBLE_DEVICES"] == ids[0]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    with pytest.raises(ValueError, match="3 GPUs asked for but 2 exist"):
        with lease(3):
            pass
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("MMSAE_NUM_GPUS")
    with lease(2) as ids:  # a CPU machine: nothing to lease
        assert ids == [] or len(ids) == 2


def test_try_hold_is_all_or_nothing(tmp_path):
    """The one lock helper behind GPU leases and endpoint slots: n of the files or none of them."""
    paths = [tmp_path / f"r{i}.lock" for i in range(3)]
    first = try_hold(paths[:2], 2)
    assert sorted(first) == [0, 1]
    assert try_hold(paths, 2) is None  # only r2 is free: nothing is taken
    only = try_hold(paths, 1)
    assert list(only) == [2]  # r2 was not left held by the failed attempt
    release([*first.values(), *only.values()])
    assert sorted(try_hold(paths, 3)) == [0, 1, 2]


@pytest.mark.parametrize("scheduler", [True, False])
def test_scheduler_assigned_devices_take_no_local_lease(eight, monkeypatch, scheduler):
    """Two SLURM jobs on one node each see their own GPU as index 0: under SLURM_JOB_ID neither takes
    gpu-0.lock, so they run at the same time; without a scheduler the one lock still serialises them."""
    monkeypatch.setenv("MMSAE_NUM_GPUS", "1")
    monkeypatch.delenv("MMSAE_GPU_LEASE", raising=False)
    for var in ("SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        monkeypatch.delenv(var, raising=False)
    if scheduler:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, "1", "1.0", str(eight / f"{i}.json")], env=os.environ.copy())
             for i in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    a, b = (json.loads((eight / f"{i}.json").read_text()) for i in range(2))
    assert a["ids"] == b["ids"] == ["0"]
    overlap = a["start"] < b["end"] and b["start"] < a["end"]
    assert overlap == scheduler
    assert (eight / "locks").exists() != scheduler  # no lock directory is made under a scheduler


def test_gpu_lease_switch(eight, monkeypatch):
    from mmsae.core.gpu import scheduler_assigned

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert scheduler_assigned() == "SLURM_JOB_ID=7"
    monkeypatch.setenv("MMSAE_GPU_LEASE", "1")  # several jobs inside one allocation: lease anyway
    assert scheduler_assigned() is None
    monkeypatch.setenv("MMSAE_GPU_LEASE", "0")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert scheduler_assigned() == "MMSAE_GPU_LEASE=0"
    monkeypatch.setenv("MMSAE_GPU_LEASE", "yes")
    with pytest.raises(ValueError, match="MMSAE_GPU_LEASE='yes'"):
        scheduler_assigned()
