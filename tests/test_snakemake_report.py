"""`snakemake --report report.zip` builds, with the main outputs registered by report() and captioned."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, default_run_dir, fake_complete_tree

pytestmark = pytest.mark.workflow

REGISTERED = {"metrics.json", "log.parquet", "index.html", "table.md", "steering.parquet", "summary.json",
              "properties.json", "loss_recovered.json", "scoring.parquet"}


def test_snakemake_report_zip(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    fake_complete_tree(tmp_path, REPO / "Snakefile")
    run = default_run_dir()
    for f in [f"{run}/sae/metrics.json", f"{run}/attribution/summary.json", "results/neurons/properties.json",
              f"{run}/sae/loss_recovered.json"]:
        (tmp_path / f).write_text('{"fvu": 0.1}')  # the report skips an empty JSON file
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--report", "report.zip"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = zipfile.ZipFile(tmp_path / "report.zip").namelist()
    assert {Path(n).name for n in names if "/data/raw/" in n} == REGISTERED
    html = zipfile.ZipFile(tmp_path / "report.zip").read("report/report.html").decode()
    assert "held-out FVU" in html and "Table 1 of arXiv 2411.14982" in html
