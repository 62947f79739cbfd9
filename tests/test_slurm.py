"""A real single-node SLURM cluster on 127.0.0.1 (munged, slurmctld, slurmd from Debian's slurm-wlm
and munge): the workflow's first steps (through train_sae) run through the executor plugin with
profiles/slurm and give the same outputs as a local run; GPU counts reach SLURM as --gpus.

Accounting: the plugin's job-status query runs with ``--slurm-status-command squeue`` (the cluster
keeps finished jobs for MinJobAge=600 s), so no slurmdbd/MariaDB is needed; ``--slurm-no-account``
skips the account lookup through sacctmgr. Two GPUs are declared as GRES backed by two character
devices (copies of /dev/null), so ``--gpus`` is accepted and shows in ``scontrol show job``.

Needs root (slurmd starts job steps) and `apt-get install slurm-wlm munge` (.ci/run installs them).
Every daemon the test starts is stopped at the end, also when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.numpy import load_file

from helpers import REPO, SNAKEMAKE, TINY, run_dir_for

pytestmark = [pytest.mark.slow, pytest.mark.workflow]

DAEMONS = ["munged", "slurmctld", "slurmd"]
# The jobstep plugin drops SLURM_* variables (SLURM_CONF included) before its inner srun, so the
# cluster's config has to be at the default path; the test writes it there only when there is none.
ETC = Path("/etc/slurm")
CLIENTS = ["sbatch", "squeue", "scontrol", "sinfo", "srun"]
SAE = f"{run_dir_for({**TINY, 'extract': {**TINY['extract'], 'parts': 1}})}/sae"
TARGET = f"{SAE}/metrics.json"
SLICE_RESOURCES = ["build_demo_model", "extract", "merge_activations", "train_sae"]


def _missing() -> str | None:
    absent = [t for t in DAEMONS + CLIENTS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if absent:
        return f"SLURM not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge (.ci/run does it as root)"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd launches job steps as the submitting user)"
    if (ETC / "slurm.conf").exists() or (ETC / "gres.conf").exists():
        return f"{ETC}/slurm.conf or gres.conf exists (a real cluster?); the test will not replace it"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """munged + slurmctld + slurmd on 127.0.0.1 with their own config, key, ports and state in ``d``."""

    def __init__(self, d: Path):
        self.d = d
        self.host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
        self.env = {**os.environ, "SLURM_CONF": str(ETC / "slurm.conf")}

    def write_config(self):
        d = self.d
        for sub in ("spool", "state", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "munge.key").write_bytes(os.urandom(1024))
        (d / "munge.key").chmod(0o600)
        for i in range(2):  # GRES devices: character devices like /dev/null
            if not (d / f"gpu{i}").exists():
                os.mknod(d / f"gpu{i}", 0o666 | 0o020000, os.makedev(1, 3))
        cpus = min(os.cpu_count() or 1, 4)
        ETC.mkdir(parents=True, exist_ok=True)
        (ETC / "slurm.conf").write_text(f"""ClusterName=mmsae-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
GresTypes=gpu
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={self.host} MaxTime=INFINITE State=UP
""")
        (ETC / "gres.conf").write_text(f"AutoDetect=off\nNodeName={self.host} Name=gpu File={d}/gpu[0-1]\n")

    def start(self):
        d = self.d
        self.write_config()
        subprocess.run([_exe("munged"), f"--key-file={d}/munge.key", f"--socket={d}/munge.sock", f"--pid-file={d}/munged.pid",
                        f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge.seed", "--force"], check=True, env=self.env)
        subprocess.run([_exe("slurmctld")], check=True, env=self.env)
        subprocess.run([_exe("slurmd")], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env).stdout.split()
            if state and all(s == "idle" for s in state):
                return
            time.sleep(1)
        raise RuntimeError(f"SLURM node not idle after 60 s: {state}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted((self.d / "log").glob("*.log")))

    def stop(self):
        """Stop slurmd, slurmctld and munged by the pids they wrote; wait until each is gone."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.d / f"{name}.pid"
            if not pid_file.exists():
                continue
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        for name in ("slurm.conf", "gres.conf"):  # written by write_config, which refuses to replace them
            (ETC / name).unlink(missing_ok=True)

    def jobs(self) -> list[dict]:
        """Every job slurmctld remembers, as {field: value} from `scontrol show job -o`."""
        out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, env=self.env).stdout
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line.strip()]


@pytest.fixture
def slurm(tmp_path_factory):
    why = _missing()
    if why:
        pytest.skip(why)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def run(wd: Path, *args, env=None):
    proc = subprocess.run([*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(wd), *args], capture_output=True,
                          text=True, cwd=wd, env=env)
    assert proc.returncode == 0, f"snakemake {' '.join(args)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_slurm_run_equals_local_run(tmp_path, slurm, demo_model_dir):
    cfg = {**TINY, "extract": {**TINY["extract"], "parts": 1}}
    runs = {}
    for name in ("local", "slurm"):
        wd = tmp_path / name
        wd.mkdir()
        (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
        shutil.copytree(demo_model_dir, wd / "results/models/demo", copy_function=os.link)
        runs[name] = wd
    run(runs["local"], "--cores", "1", TARGET)
    small = {"mem_mb": 500, "cpus_per_task": 1, "runtime": 10}
    run(runs["slurm"], TARGET, "--workflow-profile", str(REPO / "profiles/slurm"), "--jobs", "2", "--latency-wait", "5",
        "--slurm-status-command", "squeue", "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "1",
        "--default-resources", *[f"{k}={v}" for k, v in small.items()], "slurm_partition=cpu", "gpu=0", "endpoint_slots=1",
        "--set-resources", *[f"{r}:{k}={v}" for r in SLICE_RESOURCES for k, v in small.items()],
        "train_sae:slurm_partition=gpu", "--set-threads", *[f"{r}=1" for r in SLICE_RESOURCES],
        env={**slurm.env, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))})

    jobs = {j.get("Comment", ""): j for j in slurm.jobs()}
    assert {"rule_extract_wildcards_0", "rule_merge_activations", "rule_train_sae"} <= set(jobs), sorted(jobs)
    assert all(j["JobState"] == "COMPLETED" for j in jobs.values())
    train = jobs["rule_train_sae"]
    assert train["Partition"] == "gpu" and "gres:gpu:1" in train.get("TresPerJob", ""), train  # sae.gpus -> --gpus=1
    assert "gpu" not in jobs["rule_merge_activations"].get("TresPerJob", "")

    local, remote = runs["local"], runs["slurm"]
    m_local = json.loads((local / "results/activations/manifest.json").read_text())
    m_slurm = json.loads((remote / "results/activations/manifest.json").read_text())
    assert m_local == m_slurm
    for shard in m_local["shards"]:
        a = pq.read_table(local / "results/activations" / shard["path"])
        b = pq.read_table(remote / "results/activations" / shard["path"])
        assert a.equals(b)
    wa = load_file(local / f"{SAE}/sae_weights.safetensors")
    wb = load_file(remote / f"{SAE}/sae_weights.safetensors")
    assert wa.keys() == wb.keys() and all(np.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    ma = json.loads((local / f"{SAE}/metrics.json").read_text())["heldout"]
    mb = json.loads((remote / f"{SAE}/metrics.json").read_text())["heldout"]
    assert ma["l0"] == pytest.approx(mb["l0"], abs=1e-3) and ma["fvu"] == pytest.approx(mb["fvu"], abs=1e-4)


GPU_JOB = """
import json, os, sys, time
from mmsae.core.job import setup
setup(None, gpus=1)
t0 = time.time()
time.sleep(4)
json.dump({"start": t0, "end": time.time(), "job": os.environ.get("SLURM_JOB_ID"),
           "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}, open(sys.argv[1], "w"))
"""


def test_two_gpu_jobs_on_one_node_run_at_once(tmp_path, slurm):
    """Two --gpus=1 jobs on the one node, each seeing its own GPU as index 0 (as with ConstrainDevices),
    with a shared lock directory: neither takes a local lease, so they overlap in time instead of
    the second waiting on gpu-0.lock for the first (mmsae.core.gpu under SLURM_JOB_ID)."""
    (tmp_path / "job.py").write_text(GPU_JOB)
    env = {**slurm.env, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)), "MMSAE_NUM_GPUS": "1",
           "MMSAE_GPU_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("MMSAE_GPU_LEASE", None)
    outs = [tmp_path / f"job{i}.json" for i in range(2)]
    ids = []
    for i, out in enumerate(outs):
        script = f"#!/bin/sh\nexport CUDA_VISIBLE_DEVICES=0\nexec {sys.executable} {tmp_path / 'job.py'} {out}\n"
        proc = subprocess.run(["sbatch", "--parsable", "-p", "gpu", "--gpus=1", "-n1", "-c1", "--mem=300",
                               f"--comment=gpu_overlap_{i}", "-o", str(tmp_path / f"job{i}.log")],
                              input=script, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        ids.append(proc.stdout.strip().split(";")[0])
    deadline = time.time() + 120
    while not all(o.exists() for o in outs) and time.time() < deadline:
        time.sleep(0.5)
    logs = "\n".join((tmp_path / f"job{i}.log").read_text() for i in range(2) if (tmp_path / f"job{i}.log").exists())
    assert all(o.exists() for o in outs), f"jobs did not finish in 120 s\n{logs}\n{slurm.logs()}"
    a, b = (json.loads(o.read_text()) for o in outs)
    assert a["cuda"] == b["cuda"] == "0" and {a["job"], b["job"]} == set(ids)
    assert a["start"] < b["end"] and b["start"] < a["end"], (a, b, logs)  # held at the same time
    assert logs.count("no local GPU lease") == 2, logs
    jobs = {j["JobId"]: j for j in slurm.jobs()}
    assert all("gres:gpu:1" in jobs[i].get("TresPerJob", "") for i in ids), [jobs[i] for i in ids]
