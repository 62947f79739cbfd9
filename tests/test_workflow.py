"""The Snakemake workflow: lint, dry-runs, config validation, what a config change reruns, and one
end-to-end run of the whole DAG on a few images with a tiny SAE."""

import json
import os
import shutil
import subprocess
import time

import polars as pl
import pyarrow as pa
import pytest
import yaml
from helpers import REPO, SNAKEMAKE, TINY, jobs, run_dir_for, smk, workdir_with
from markupsafe import escape

from mmsae.workflow.script_hash import script_hash

EXPLAIN_AND_AFTER = {"explain_chunk": 1, "gather_explanations": 1, "refine_explanations": 1, "evaluate": 1, "steer": 1,
                     "score_explanations": 1, "report": 1, "export": 1, "all": 1}  # steer judges its generations by the explanations' words
DOWNSTREAM_OF_SELECTION = {"select_top": 1, "render_maps": 1, "steer": 1, **EXPLAIN_AND_AFTER}


@pytest.mark.workflow
def test_lint_is_clean(tmp_path):
    proc = smk(workdir_with(tmp_path, yaml.safe_load((REPO / "config.yaml").read_text())), "--lint")
    assert "good condition" in proc.stdout + proc.stderr


@pytest.mark.workflow
def test_default_config_dry_runs(tmp_path):
    proc = smk(workdir_with(tmp_path, yaml.safe_load((REPO / "config.yaml").read_text())), "-n")
    assert jobs(proc) == {"build_demo_model": 1, "extract": 1, "merge_activations": 1, "train_sae": 1, "encode": 1,
                          "merge_codes": 1, "select_top": 1,
                          "render_maps": 1, "explain_chunk": 1, "gather_explanations": 1, "refine_explanations": 1,
                          "evaluate": 1, "steer": 1, "attribute": 1, "list_images": 1, "find_neurons": 1, "edit_neurons": 1,
                          "loss_recovered": 1, "score_explanations": 1, "report": 1, "crossmodal": 1, "export": 1,
                          "repair": 1, "all": 1}


@pytest.mark.workflow
def test_paper_config_dry_runs_to_the_evaluation_table(tmp_path):
    cfg = yaml.safe_load((REPO / "config/llava-next-8b.yaml").read_text())
    cfg["evaluate"]["require_models"] = False  # the models are not in this machine's cache (tests/test_config_layering.py)
    run = run_dir_for(cfg)
    assert run.startswith("results/runs/llava-next-8b-l24-k256-")
    proc = smk(workdir_with(tmp_path, cfg), "-n", f"{run}/evaluation/table.md")
    assert jobs(proc) == {"extract": 1, "merge_activations": 1, "train_sae": 1, "encode": 1, "merge_codes": 1,
                          "select_top": 1, "render_maps": 1, "explain_chunk": 8,
                          "gather_explanations": 1, "refine_explanations": 1, "evaluate": 1}
    assert f"{run}/sae/cfg.json" in proc.stdout + proc.stderr


@pytest.mark.workflow
def test_slurm_profile_dry_runs(tmp_path):
    cfg = yaml.safe_load((REPO / "config/llava-next-8b.yaml").read_text())
    cfg["evaluate"]["require_models"] = False  # the models are not in this machine's cache (tests/test_config_layering.py)
    proc = smk(workdir_with(tmp_path, cfg), "--workflow-profile", str(REPO / "profiles/slurm"), "-n")
    text = proc.stdout + proc.stderr
    assert jobs(proc)["explain_chunk"] == 8 and "slurm_partition=gpu" in text and "runtime=1440" in text


@pytest.mark.workflow
def test_hub_model_needs_no_demo_build(tmp_path):
    cfg = {**TINY, "model": {"source": "llava-hf/llama3-llava-next-8b-hf", "hook_point": "model.language_model.layers.24",
                             "dtype": "bfloat16"}}
    assert "build_demo_model" not in jobs(smk(workdir_with(tmp_path, cfg), "-n"))


@pytest.mark.workflow
@pytest.mark.parametrize("cfg,field", [
    ({"sae": {"kk": 3}}, "kk"),
    ({"sae": {"k": 0}}, "k"),
    ({"model": {"dtype": "int8"}}, "int8"),
    ({"corpus": {"source": "web"}}, "web"),
])
def test_bad_config_stops_before_any_job(tmp_path, cfg, field):
    proc = smk(workdir_with(tmp_path, cfg), "-n", check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert field in text and "validat" in text.lower()
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.workflow
def test_end_to_end_and_rerun_scope(tmp_path, demo_model_dir):
    wd = workdir_with(tmp_path, TINY)
    # The demo model is built once per test session (hard links, no copy); the rule is tested by the
    # identity test and by the default run.
    shutil.copytree(demo_model_dir, wd / "results/models/demo", copy_function=os.link)
    smk(wd, "--cores", "2")
    run = wd / run_dir_for(TINY)
    report = (run / "report/index.html").read_text()
    assert "Embedded demo model" in report and "Feature " in report and "data:image/jpeg;base64" in report
    assert "Explanations:" in report and "id=evaluation" in report and "unavailable" in report and "id=steering" in report and "id=attribution" in report
    summary = json.loads((run / "attribution/summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["capital", "cat"] and summary["cases"][1]["maps"]
    assert "id=neurons" in report
    assert "Loss recovered (held-out, spliced SAE)" in report
    assert set(json.loads((run / "sae/loss_recovered.json").read_text())) >= {"text", "answer", "samples"}
    edits = pl.read_parquet(wd / "results/neurons/edits/edits.parquet")
    assert edits["method"].to_list() == ["closed_form", "optimised"]
    assert all((wd / "results/neurons/edits" / p).is_file() for p in edits["delta_path"])
    expl = pl.read_parquet(run / "explanations/explanations.parquet")
    assert expl.height == 4 and expl["error"].null_count() == 4  # every feature answered by transformers serve
    manifest = json.loads((wd / "results/activations/manifest.json").read_text())
    assert manifest["n_samples"] == 5 and manifest["n_image_tokens"] > 0 and manifest["n_text_tokens"] > 0
    assert manifest["parts"] == ["part-0", "part-1"]  # extraction fanned out over 2 jobs
    codes = json.loads((run / "codes/manifest.json").read_text())
    assert codes["parts"] == ["part-0", "part-1"]
    # the same corpus: every extracted token is encoded but the special tokens the SAE was trained without
    assert codes["n_tokens_excluded"] > 0 and codes["n_tokens"] + codes["n_tokens_excluded"] == manifest["n_tokens"]
    metrics = json.loads((run / "sae/metrics.json").read_text())
    assert metrics["heldout"]["l0"] <= 8 and 0 < metrics["heldout"]["fvu"] < 2
    cfg = json.loads((run / "sae/cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_sae"] == 256 and cfg["d_in"] == 576
    assert jobs(smk(wd, "-n")) == {}  # nothing to do
    # an SAE parameter reruns training and everything after it, not extraction
    changed = {**TINY, "sae": {**TINY["sae"], "k": 4}}
    (wd / "config.yaml").write_text(yaml.safe_dump(changed))
    assert jobs(smk(wd, "-n")) == {"train_sae": 1, "encode": 2, "merge_codes": 1, "attribute": 1, "loss_recovered": 1,
                                   "crossmodal": 1, **DOWNSTREAM_OF_SELECTION}
    # a selection parameter reruns only selection and what follows
    changed = {**TINY, "features": {**TINY["features"], "top_n": 2}}
    (wd / "config.yaml").write_text(yaml.safe_dump(changed))
    assert jobs(smk(wd, "-n")) == DOWNSTREAM_OF_SELECTION
    # an explainer parameter reruns only the explanations and the report
    changed = {**TINY, "explain": {**TINY["explain"], "max_tokens": 9}}
    (wd / "config.yaml").write_text(yaml.safe_dump(changed))
    assert jobs(smk(wd, "-n")) == EXPLAIN_AND_AFTER


@pytest.mark.slow
@pytest.mark.workflow
def test_remote_explainer_chunks_and_secret_stays_out(tmp_path, demo_model_dir):
    """A remote endpoint with a key from the environment: 2 chunk jobs, and the key is nowhere on disk.
    The corpus is a dirty folder (three photos plus every kind of bad file): the workflow runs to the
    report, which accounts for every file as used, converted (with the reason) or skipped (with it)."""
    from dirty import make_dirty_folder
    from fake_server import FakeEndpoint

    from mmsae.data import skimage_photo_paths

    images = tmp_path / "images"
    expect = make_dirty_folder(images)
    for name, path in skimage_photo_paths(["chelsea", "rocket", "coffee"]).items():
        shutil.copy(path, images / f"{name}{path.suffix}")
        expect[f"{name}{path.suffix}"] = "ok"
    secret = "sk-mmsae-test-9f8e7d6c"
    with FakeEndpoint(script=[500, ("429", 0.1)], latency_s=0.05) as ep:
        cfg = {**TINY, "corpus": {**TINY["corpus"], "source": "folder", "path": "images"},
               "explain": {"server": "remote", "base_url": ep.base_url, "model": "explainer-x",
                           "api_key_env": "MMSAE_TEST_KEY", "chunks": 2, "concurrency": 2}}
        wd = workdir_with(tmp_path, cfg)
        shutil.copytree(demo_model_dir, wd / "results/models/demo", copy_function=os.link)
        os.environ["MMSAE_TEST_KEY"] = secret
        try:
            smk(wd, "--cores", "2")
        finally:
            del os.environ["MMSAE_TEST_KEY"]
        explain_requests = [b for b in ep.bodies if "We are studying one unit" in json.dumps(b["messages"])]  # the explainer prompts open so
        assert len(explain_requests) == 4 + 2 and set(ep.auth_headers) == {f"Bearer {secret}"}
        assert len(ep.bodies) > len(explain_requests)  # the refiner used the same endpoint and key
        assert ep.max_in_flight <= 2
    run = wd / run_dir_for(cfg)
    expl = pl.read_parquet(run / "explanations/explanations.parquet")
    assert expl["status"].to_list() == ["ok"] * 4 and set(expl["explanation"]) == {"red circles"}
    report = (run / "report/index.html").read_text()
    assert "red circles" in report
    manifest = json.loads((wd / "results/activations/manifest.json").read_text())
    skipped = {(wd / s["image"]).resolve().relative_to(images.resolve()).as_posix(): s["reason"] for s in manifest["skipped"]}
    converted = {c["image"]: c["reason"] for c in manifest["converted"]}
    used = {k for k, v in expect.items() if not v.startswith("skip")}
    assert set(skipped) == set(expect) - used and manifest["n_images_used"] == len(used)
    for name, want in expect.items():  # every file accounted for, with its reason, in the report too
        if want.startswith("skip: "):
            assert skipped[name].startswith(want[6:]) and escape(skipped[name]) in report, name
        elif want.startswith("converted"):
            assert converted[name].startswith(want) and escape(f"{name}: {converted[name]}") in report, name
    assert f"<td>{len(used)} ({len(converted)}) / {len(skipped)}</td>" in report
    leaks = [p for p in wd.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.workflow
def test_failed_job_logs_its_traceback(tmp_path):
    """An uncaught exception in an entry script reaches the rule's log file, not only stderr."""
    (tmp_path / "fail.py").write_text("from mmsae.core.job import setup\n"
                                      "log = setup(snakemake.log[0])\nlog.info('started')\n"
                                      "def inner():\n    raise ValueError('corpus.path: boom')\ninner()\n")
    (tmp_path / "Snakefile").write_text('rule fail:\n    output: "out.txt"\n    log: "logs/fail.log"\n'
                                        '    script: "fail.py"\n')
    proc = subprocess.run([*SNAKEMAKE, "-s", "Snakefile", "--cores", "1"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    log = (tmp_path / "logs/fail.log").read_text()
    assert "started" in log and "Traceback" in log and "in inner" in log and "ValueError: corpus.path: boom" in log


def test_every_entry_script_sets_up_its_log():
    for script in sorted((REPO / "workflow_scripts").glob("*.py")):
        assert "setup(sm.log[0]" in script.read_text(), f"{script.name} does not log to its rule's log file"


@pytest.mark.workflow
@pytest.mark.parametrize("cfg,field", [
    ({"sae": {"k": 64, "d_sae": 32}}, "sae.k=64"),
    ({"model": {"hook_point": "model.language_model.layers.30"}}, "model.hook_point"),
    ({"corpus": {"source": "folder", "path": "/no/such/folder"}}, "corpus.train.path"),  # a legacy single corpus
    ({"corpus": {"interpret": {"source": "table"}}}, "corpus.interpret.path is required"),
])
def test_config_errors_stop_at_load(tmp_path, cfg, field):
    """Cross-field rules, paths and the hook point are checked before any job (not after extraction)."""
    proc = smk(workdir_with(tmp_path, cfg), "-n", check=False)
    assert proc.returncode != 0
    assert field in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
def test_hook_point_is_checked_against_a_local_models_config(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava_next", "text_config": {"num_hidden_layers": 4}}))
    proc = smk(workdir_with(tmp_path, {"model": {"source": str(model), "hook_point": "model.language_model.layers.4"}}),
               "-n", check=False)
    assert proc.returncode != 0 and "has 4 layers" in proc.stdout + proc.stderr
    smk(workdir_with(tmp_path, {"model": {"source": str(model), "hook_point": "model.language_model.layers.3"}}), "-n")


@pytest.mark.workflow
def test_failed_encode_leaves_no_code_folder(tmp_path, tiny_llava_dir):
    """A part's codes are a directory output written whole (into a hidden sibling renamed at the end):
    after a failed encode there is no folder of the part and no temporary one, and the next run redoes it.
    encode runs the model with the SAE; it needs no activations."""
    from mmsae.core.io import write_json, write_parquet
    from mmsae.sae import TopKSAE, save_sae

    hook = "model.language_model.layers.2"
    cfg = {"model": {"source": str(tiny_llava_dir), "hook_point": hook},
           "corpus": {"interpret": {"names": ["chelsea"], "prompts": [""], "text_prompts": ["Hi."]}},
           "encode": {"shard_tokens": 20}, "extract": {"parts": 1}}
    wd = workdir_with(tmp_path, cfg)
    run = run_dir_for(cfg)
    # a trained SAE (its training inputs stand in: encode does not read them)
    write_json(wd / "results/activations/part-0/manifest.json", {})
    write_parquet(wd / "results/activations/part-0/samples.parquet", pa.table({"sample_id": ["s0"]}))
    write_json(wd / "results/activations/manifest.json", {})
    write_parquet(wd / "results/activations/samples.parquet", pa.table({"sample_id": ["s0"]}))
    sae_dir = wd / run / "sae"
    save_sae(TopKSAE(64, 128, k=4, seed=0), sae_dir, model_name="m", hook_point=hook)
    for f in ["metrics.json", "heldout.json", "log.parquet", "sparsity.safetensors"]:
        (sae_dir / f).write_text("{}")
    codes = wd / run / "codes/part-0"
    smk(wd, "--cores", "1", f"{run}/codes/part-0")
    made = sorted(p.name for p in codes.iterdir())
    assert {"manifest.json", "samples.parquet", "codes-00000.parquet", "codes-00001.parquet"} <= set(made)
    assert not (wd / "results/activations/part-0/shard-00000.parquet").exists()  # no dense activations were written
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    (sae_dir / "cfg.json").write_text(json.dumps({**cfg, "hook_name": "model.language_model.layers.3"}))
    proc = smk(wd, f"{run}/codes/part-0", "--cores", "1", check=False)
    assert proc.returncode != 0
    log = (wd / run / "logs/encode-0.log").read_text()
    assert "trained at hook point 'model.language_model.layers.3'" in log
    assert not codes.exists(), f"a failed encode left {sorted(p.name for p in codes.iterdir())}"
    assert not list(codes.parent.glob(".part-0.tmp-*"))
    assert "encode" in jobs(smk(wd, "-n", f"{run}/codes/part-0"))


def test_code_hash_ignores_prose_and_layout_but_not_code(tmp_path):
    """A rule's code hash: editing comments, docstrings, string statements or line layout of a module
    its script imports changes nothing; changing code (a value, a string literal in use, an f-string
    statement, whose expressions run) changes it."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    script = tmp_path / "script.py"
    script.write_text("from pkg.mod import f\n")
    mod = tmp_path / "pkg" / "mod.py"
    base = '"""Module doc."""\nimport os\n\n\ndef f(x):\n    """Doc."""\n    return x + 1  # one\n\n\nS = "a"\n'
    same = ['"""Another doc,\non two lines."""\nimport os\n# a comment\n\ndef f(x):\n  return x \\\n      + 1\n\n\nS = "a"\n',
            'import os\n\n\ndef f(x):\n    "a string statement"\n    return x + 1\n\n\nS = "a"\n',
            base.replace("def f(x):\n", "def f(x):\n    'two' 'parts'\n    rb'bytes'\n"),
            "\ufeff" + base, base.replace("\n", "\r\n")]
    other = [base.replace("x + 1", "x + 2"), base.replace('S = "a"', 'S = "b"'),
             base.replace('    """Doc."""\n', '    f"{print(x)}"\n'), base.replace("import os", "import sys"),
             base.replace('    """Doc."""\n', '    "-".join(x)\n'), base.replace('    """Doc."""\n', '    "%s" % x\n'),
             base.replace('    """Doc."""\n', '    "a"; x = 2\n'),
             base.replace("    return x + 1  # one\n", "    if x:\n        x = 2\n    return x + 1\n"),
             base.replace("    return x + 1  # one\n", "    if x:\n        x = 2\n        return x + 1\n"),
             "# -*- coding: latin-1 -*-\n" + base.replace('S = "a"', 'S = "é"')]

    def digest(text):
        mod.write_bytes(text.encode("utf-8"))
        os.utime(mod, ns=(0, len(digest.seen)))  # a new mtime each time: the memo must not answer
        digest.seen.append(text)
        return script_hash(script, tmp_path, package="pkg")
    digest.seen = []
    h = digest(base)
    assert [digest(t) for t in same] == [h] * len(same)
    hashes = [digest(t) for t in other]
    assert h not in hashes and len(set(hashes)) == len(other)
    utf8 = digest(base.replace('S = "a"', 'S = "é"'))
    assert utf8 not in hashes  # the same bytes read as latin-1 are other code
    assert digest("def f(:\n") != digest("def g(:\n")  # does not tokenize: its bytes count, and the load goes on
    mod.write_text("X = 1\n")
    one = script_hash(script, tmp_path, package="pkg")
    st = mod.stat()
    time.sleep(0.01)
    mod.write_text("X = 2\n")  # same size, and the old modification time put back (as cp -p or tar do)
    os.utime(mod, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert script_hash(script, tmp_path, package="pkg") != one  # the memo must not answer for the old text
