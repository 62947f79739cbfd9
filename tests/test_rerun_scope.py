"""What a change reruns: every leaf key of config/schema.yaml, changed one at a time on a complete
(touched) results tree, against the table below; and an edit of one package module.

The table RERUNS is the documentation of what depends on what: one line per schema leaf, the rules
whose jobs `snakemake -n` would rerun when that key alone changes (downstream jobs included; the
aggregate rule ``all`` is left out). A leaf of the schema that is missing from the table fails the
test with the list of missing keys, so whoever adds a key adds its line here.

Runs in-process through Snakemake's API (one DAG per change, well under a second each).
"""

from __future__ import annotations

import copy
import shutil

import pytest
import yaml
from helpers import REPO, dry_run, fake_complete_tree

pytestmark = pytest.mark.workflow  # ~150 DAGs: one per schema leaf and per module edit
WORKFLOW_FILES = ["Snakefile", "rules", "workflow_scripts", "mmsae", "config", "envs", "report", "pyproject.toml"]

# Rule groups, each with everything downstream of it in the default config.yaml.
REPORT = {"report"}
EXPORT = {"export"} | REPORT  # reads the scores, explanations, maps, selection, codes, SAE and model; the report lists its top logits
SCORE = {"score_explanations"} | REPORT | EXPORT
EXPLAIN = {"explain_chunk", "gather_explanations", "refine_explanations", "evaluate", "steer"} | SCORE  # steer judges by explanation words
REFINE = {"refine_explanations", "evaluate"} | SCORE  # scoring reads the refined categories
SELECT = {"select_top", "render_maps", "steer"} | EXPLAIN
MAPS = {"render_maps"} | EXPLAIN
CROSS = {"crossmodal"} | REPORT
ENCODE = {"encode", "merge_codes"} | SELECT | CROSS  # the interpretation corpus's codes and everything read from them
TRAIN = {"train_sae", "attribute", "repair", "loss_recovered"} | ENCODE
EXTRACT = {"extract", "merge_activations"} | TRAIN
FIND = {"find_neurons", "edit_neurons"} | REPORT
LIST = {"list_images"} | FIND
EDIT = {"edit_neurons"} | REPORT
MODEL = EXTRACT | FIND | {"steer", "attribute", "repair", "report"}
DEMO = {"build_demo_model"} | MODEL | EXPLAIN  # the local explainer serves the demo model
NONE: set[str] = set()

RERUNS: dict[str, set[str]] = {
    "run_name": TRAIN,  # a new folder under results/runs/: the SAE and everything after it, not the activations
    "model.source": (MODEL | EXPLAIN) - {"build_demo_model"},
    "model.dtype": MODEL,
    "model.device": MODEL | {"evaluate"},
    "model.hook_point": EXTRACT | {"steer"},
    "demo_model.image_size": DEMO,
    "demo_model.patch_size": DEMO,
    "demo_model.vision_hidden_size": DEMO,
    "demo_model.vision_layers": DEMO,
    "demo_model.seed": DEMO,
    "corpus.train.source": EXTRACT,
    "corpus.train.names": EXTRACT,
    "corpus.train.path": EXTRACT,  # with source folder: a path with skimage is an error at load
    "corpus.train.prompts": EXTRACT,
    "corpus.train.text_prompts": EXTRACT,
    "corpus.train.max_images": EXTRACT,
    "corpus.train.text_source": EXTRACT,  # text passages: extracted, not listed (the listing is about images)
    "corpus.interpret.source": ENCODE | LIST,  # list_images lists the interpretation images (find_neurons reads it)
    "corpus.interpret.names": ENCODE | LIST,
    "corpus.interpret.path": ENCODE | LIST,  # with source folder: a path with skimage is an error at load
    "corpus.interpret.prompts": ENCODE,
    "corpus.interpret.text_prompts": ENCODE,
    "corpus.interpret.max_images": ENCODE | LIST,
    "corpus.interpret.text_source": ENCODE,
    "encode.batch_size": ENCODE,
    "encode.shard_tokens": ENCODE,
    "encode.base_view_only": ENCODE,
    "extract.batch_size": EXTRACT,
    "extract.parts": EXTRACT,
    "extract.shard_tokens": EXTRACT,
    "extract.dtype": EXTRACT,
    "extract.token_fraction": EXTRACT,
    "extract.seed": NONE,  # draws the subsample only: unused at the default token_fraction 1
    "extract.check_disk": NONE,  # read at run time
    "extract.max_image_pixels": EXTRACT | LIST,
    "sae.name": TRAIN,
    "sae.gpus": NONE,
    "sae.d_sae": TRAIN,
    "sae.k": TRAIN,
    "sae.architecture": TRAIN,  # another SAE: its codes and everything read from them
    "sae.matryoshka_prefixes": TRAIN,  # in train_sae's params (and the run name) even while the architecture is topk
    "sae.steps": TRAIN,
    "sae.batch_size": TRAIN,
    "sae.lr": TRAIN,
    "sae.warmup_steps": TRAIN,
    "sae.decay_start": TRAIN,
    "sae.lr_decay_steps": TRAIN,
    "sae.aux_coef": TRAIN,
    "sae.k_aux": TRAIN,
    "sae.dead_tokens": TRAIN,
    "sae.grad_clip": TRAIN,
    "sae.b_dec_init": TRAIN,
    "sae.b_dec_init_tokens": TRAIN,
    "sae.heldout_fraction": TRAIN,
    "sae.heldout_max_tokens": TRAIN,
    "sae.buffer_tokens": TRAIN,
    "sae.exclude_special_tokens": TRAIN,
    "sae.seed": TRAIN,
    "sae.lr_schedule": TRAIN,
    "sae.normalize_activations": TRAIN,
    "sae.exclude_norm_above": TRAIN,
    "sae.checkpoint_every": NONE,
    "sae.source": TRAIN,  # online: train_sae reads the model instead of the activations
    "loss_recovered.enabled": REPORT | EXPORT,  # the Hub card carries loss recovered
    "loss_recovered.max_samples": {"loss_recovered"} | REPORT | EXPORT,
    "features.top_n": SELECT,
    "features.rank_by": SELECT,
    "features.map_threshold": MAPS | CROSS,  # also the cross-modal examples' highlight
    "features.select.mode": SELECT,
    "features.select.n": SELECT,
    "features.select.ids": SELECT,
    "features.select.min_samples": SELECT,
    "features.select.max_frequency": SELECT,
    "features.select.per_modality": SELECT,
    "features.crossmodal.enabled": REPORT,  # the report's inputs change; nothing else
    "features.crossmodal.threshold": CROSS,
    "features.crossmodal.min_pairs": CROSS,
    "features.crossmodal.n_boot": CROSS,
    "features.crossmodal.seed": CROSS,
    "features.crossmodal.show": CROSS,
    "explain.enabled": {"steer"} | REPORT | EXPORT,  # steer reads explanation words when there are explanations
    "explain.server": EXPLAIN,
    "explain.local_model": EXPLAIN,
    "explain.base_url": NONE,  # unused with explain.server local
    "explain.model": NONE,  # unused with explain.server local
    "explain.api_key_env": NONE,
    "explain.temperature": EXPLAIN,
    "explain.max_tokens": EXPLAIN,
    "explain.extra_body": EXPLAIN,
    "explain.concurrency": NONE,
    "explain.timeout_s": NONE,
    "explain.retries": NONE,
    "explain.chunks": EXPLAIN,
    "explain.max_images": EXPLAIN,
    "steer.enabled": REPORT,
    "steer.features": {"steer"} | REPORT,
    "steer.match": {"steer"} | REPORT,
    "steer.auto": {"steer"} | REPORT,
    "steer.auto_pick": {"steer"} | REPORT,
    "steer.prompts": {"steer"} | REPORT,
    "steer.values": {"steer"} | REPORT,
    "steer.scale": {"steer"} | REPORT,
    "steer.positions": {"steer"} | REPORT,
    "steer.mode": {"steer"} | REPORT,
    "steer.max_new_tokens": {"steer"} | REPORT,
    "steer.success_max_ppl_ratio": {"steer"} | REPORT,
    "attribution.enabled": REPORT,
    "attribution.pool": {"attribute"} | REPORT,
    "attribution.top_k": {"attribute"} | REPORT,
    "attribution.validate_top": {"attribute"} | REPORT,
    "attribution.cases": {"attribute"} | REPORT,
    "attribution.method": {"attribute"} | REPORT,
    "repair.enabled": REPORT,
    "repair.cases": {"repair"} | REPORT,
    "repair.budget": {"repair"} | REPORT,
    "repair.ablate_values": {"repair"} | REPORT,
    "repair.clamp_values": {"repair"} | REPORT,
    "repair.control_draws": {"repair"} | REPORT,
    "repair.seed": {"repair"} | REPORT,
    "repair.max_new_tokens": {"repair"} | REPORT,
    "repair.max_ppl_ratio": {"repair"} | REPORT,
    "neurons.enabled": REPORT,
    "neurons.prompt": FIND,
    "neurons.prompt_prefix": FIND,
    "neurons.text_prompts": FIND,
    "neurons.max_images": FIND,
    "neurons.max_new_tokens": FIND,
    "neurons.coefficient": FIND,
    "neurons.top_k": FIND,
    "neurons.heatmap_neurons": FIND,
    "neurons.top_tokens": FIND,
    "neurons.causal_k": FIND,
    "neurons.noise_scales": FIND,
    "neurons.fluency_tolerance": FIND,
    "neurons.causal_cases": FIND,
    "neurons.seed": FIND,
    "neurons.edit_k": EDIT,
    "neurons.eta": EDIT,
    "neurons.opt_steps": EDIT,
    "neurons.edits": EDIT,
    "neurons.locality_prompts": EDIT,
    "evaluate.enabled": SCORE,  # scoring labels features with the evaluation's categories (its answers come from the cache)
    "evaluate.require_models": NONE,  # only gates the load (a model presence check)
    "evaluate.include_untagged": REFINE,
    "evaluate.refiner.server": NONE,  # null = the explainer's (local); set to local: the same endpoint
    "evaluate.refiner.local_model": REFINE,
    "evaluate.refiner.base_url": NONE,  # unused with a local refiner
    "evaluate.refiner.model": NONE,
    "evaluate.refiner.api_key_env": NONE,
    "evaluate.refiner.max_tokens": REFINE,
    "evaluate.categorizer.server": NONE,  # null = the refiner's (local); set to local: the same endpoint
    "evaluate.categorizer.local_model": REFINE,
    "evaluate.categorizer.base_url": NONE,  # unused with a local categorizer
    "evaluate.categorizer.model": NONE,
    "evaluate.categorizer.api_key_env": NONE,
    "evaluate.categorizer.max_tokens": REFINE,
    "evaluate.region": {"evaluate"} | REPORT,
    "evaluate.sam_masks": {"evaluate"} | REPORT,
    "evaluate.detector": {"evaluate"} | REPORT,
    "evaluate.segmenter": {"evaluate"} | REPORT,
    "evaluate.clip": {"evaluate"} | REPORT,
    "evaluate.clip_backend": {"evaluate"} | REPORT,
    "evaluate.box_threshold": {"evaluate"} | REPORT,
    "evaluate.text_threshold": {"evaluate"} | REPORT,
    "evaluate.threshold": {"evaluate"} | REPORT,
    "evaluate.n_random_images": {"evaluate"} | REPORT,
    "evaluate.iou_trials": {"evaluate"} | REPORT,
    "evaluate.clip_trials": {"evaluate"} | REPORT,
    "evaluate.n_boot": {"evaluate"} | REPORT,
    "evaluate.seed": {"evaluate"} | REPORT,
    "scoring.enabled": REPORT | EXPORT,  # the export carries the scores
    "scoring.n_examples": SCORE,
    "scoring.max_features": SCORE,
    "scoring.seed": SCORE,
    "scoring.include_untagged": SCORE,
    "scoring.fuzz_threshold": SCORE,
    "scoring.n_quantiles": SCORE,
    "scoring.per_quantile": SCORE,
    "scoring.mode": SCORE,
    "scoring.top_logprobs": SCORE,
    "scoring.prompts": SCORE,
    "scoring.scorer.server": NONE,  # null = the explainer's (local); set to local: the same endpoint
    "scoring.scorer.local_model": SCORE,
    "scoring.scorer.base_url": NONE,  # unused with a local scorer
    "scoring.scorer.model": NONE,
    "scoring.scorer.api_key_env": NONE,
    "scoring.scorer.max_tokens": SCORE,
    "report.banner": REPORT,
    "export.enabled": REPORT,  # what rule all requests, and the report's inputs (top logits of text features)
    "export.release": EXPORT,
    "export.source_set": EXPORT,
    "export.hub_repo_id": EXPORT,
    "export.top_logits": EXPORT,
    "export.logits_norm_weight": EXPORT,
}

# Changes that the generic rule (see `changed`) cannot make valid on its own: {leaf: {key: value}}.
CHANGES: dict[str, dict] = {
    "model.source": {"model.source": "llava-hf/llava-v1.6-mistral-7b-hf"},
    "model.device": {"model.device": "cpu"},
    "model.hook_point": {"model.hook_point": "model.language_model.layers.14"},
    "corpus.train.source": {"corpus.train.source": "folder", "corpus.train.path": "images"},
    "corpus.interpret.source": {"corpus.interpret.source": "folder", "corpus.interpret.path": "images"},
    "corpus.train.path": {"corpus.train.source": "folder", "corpus.train.path": "images"},
    "corpus.interpret.path": {"corpus.interpret.source": "folder", "corpus.interpret.path": "images"},
    "corpus.train.text_source": {"corpus.train.text_source": {"name": "python-topics", "max_tokens": 500}},
    "corpus.interpret.text_source": {"corpus.interpret.text_source": {"name": "python-topics", "max_tokens": 500}},
    "sae.name": {"sae.name": "other"},
    "sae.matryoshka_prefixes": {"sae.matryoshka_prefixes": [8]},
    "explain.server": {"explain.server": "remote", "explain.base_url": "http://127.0.0.1:9/v1", "explain.model": "m"},
    "explain.api_key_env": {"explain.api_key_env": "OTHER_KEY"},
    "evaluate.refiner.api_key_env": {"evaluate.refiner.api_key_env": "OTHER_KEY"},
    "evaluate.categorizer.api_key_env": {"evaluate.categorizer.api_key_env": "OTHER_KEY"},
    "scoring.scorer.api_key_env": {"scoring.scorer.api_key_env": "OTHER_KEY"},
    "features.select.mode": {"features.select.mode": "list", "features.select.ids": [1, 2]},
    "steer.prompts": {"steer.prompts": [{"prompt": "Hi."}]},
    "attribution.cases": {"attribution.cases": [{"name": "x", "prompt": "Hi", "answer": " a", "baseline": " b"}]},
    "repair.cases": {"repair.cases": [{"name": "x", "prompt": "Hi", "wrong": " a", "correct": " b"}]},
    "neurons.edits": {"neurons.edits": [{"name": "x", "source": "cat", "target": "cow"}]},
}


def schema_leaves(schema: dict, prefix: str = "", root: dict | None = None) -> dict[str, dict]:
    """{dotted key: its schema} for every leaf: a property that is not an object with properties
    (a ``$ref`` to ``#/$defs/...`` is followed, so both corpus roles list their keys)."""
    root = schema if root is None else root
    out = {}
    for name, sub in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        if "$ref" in sub:
            sub = {**root["$defs"][sub["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in sub.items() if k != "$ref"}}
        if sub.get("type") == "object" and "properties" in sub:
            out.update(schema_leaves(sub, key + ".", root))
        else:
            out[key] = sub
    return out


def get(cfg: dict, key: str, default=None):
    for part in key.split("."):
        cfg = cfg.get(part, {}) if isinstance(cfg, dict) else {}
    return cfg if cfg != {} else default


def put(cfg: dict, key: str, value):
    *parents, last = key.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    cfg[last] = value


def changed(key: str, sch: dict, value):
    """A different value that the schema accepts (the generic rule for one leaf)."""
    types = sch.get("type") if isinstance(sch.get("type"), list) else [sch.get("type")]
    if "enum" in sch:
        return next(v for v in sch["enum"] if v != value and v is not None)
    if value is None:
        return "x" if "string" in types else 2 if "integer" in types else 0.5 if "number" in types else None
    if isinstance(value, bool):
        return not value
    if isinstance(value, int) and "integer" in types:
        return value + 1 if value + 1 <= sch.get("maximum", value + 1) else value - 1
    if isinstance(value, (int, float)):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return value + "-x"
    if isinstance(value, list):
        kind = sch.get("items", {}).get("type")
        return value + ({"string": ["extra"], "integer": [1], "number": [1.5]}[kind])
    if isinstance(value, dict):
        return {**value, "x": 1}
    raise AssertionError(f"no generic change for {key}={value!r}; add it to CHANGES")


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A copy of the workflow (so module edits stay local) and a touched results tree for config.yaml;
    HF_HUB_CACHE is a fake cache holding the evaluation's models (so evaluate.require_models: true loads)."""
    cache = tmp_path_factory.mktemp("hub")
    for repo_id in ("IDEA-Research/grounding-dino-base", "facebook/sam-vit-huge", "openai/clip-vit-base-patch32"):
        snap = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True)
        (snap.parents[1] / "refs").mkdir()
        (snap.parents[1] / "refs/main").write_text("0" * 40)
        for name in ("config.json", "model.safetensors"):
            (snap / name).write_text("{}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        yield _complete(tmp_path_factory)


def _complete(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for name in WORKFLOW_FILES:
        src = REPO / name
        (shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy2(src, root / name))
    wd = tmp_path_factory.mktemp("run")
    (wd / "images").mkdir()
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    (wd / "config.yaml").write_text(yaml.safe_dump(base))
    fake_complete_tree(wd, root / "Snakefile")
    return root, wd, base


def test_every_schema_leaf_is_in_the_table():
    leaves = schema_leaves(yaml.safe_load((REPO / "config/schema.yaml").read_text()))
    missing = sorted(set(leaves) - set(RERUNS))
    stale = sorted(set(RERUNS) - set(leaves))
    assert not missing and not stale, (
        f"tests/test_rerun_scope.py RERUNS: add one line per new schema leaf {missing}; remove {stale}")


def test_each_leaf_reruns_exactly_its_rules(complete):
    root, wd, base = complete
    leaves = schema_leaves(yaml.safe_load((REPO / "config/schema.yaml").read_text()))
    # the base config with the schema's defaults filled in, so that every leaf has its value
    wrong = []
    try:
        for key, sch in leaves.items():
            if key not in RERUNS:
                continue
            cfg = copy.deepcopy(base)
            change = CHANGES[key] if key in CHANGES else {key: changed(key, sch, get(base, key, sch.get("default")))}
            for k, v in change.items():
                put(cfg, k, v)
            (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
            rerun = dry_run(wd, root / "Snakefile").rerun
            rerun.discard("all")
            if rerun != RERUNS[key]:
                wrong.append(f"{key}: reruns {sorted(rerun)}; the table says {sorted(RERUNS[key])}"
                             f" (extra {sorted(rerun - RERUNS[key])}, missing {sorted(RERUNS[key] - rerun)})")
    finally:
        (wd / "config.yaml").write_text(yaml.safe_dump(base))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module,rules", [
    ("mmsae/sae/trainer.py", TRAIN),
    ("mmsae/codes/encode.py", ENCODE),
    ("mmsae/explain/prompts.py", EXPLAIN | {"gather_explanations"}),
    ("mmsae/report/sections.py", REPORT),
    ("mmsae/neurons/edit.py", FIND),
    ("mmsae/codes/top_lists.py", SELECT),  # the selection's aggregation: not the encoding, nor what only reads codes
    ("mmsae/interventions/steer.py", {"steer", "repair"} | REPORT),  # repair generates with steering's generate
    ("mmsae/workflow/script_hash.py", NONE),  # the Snakefile's own helper: no job imports it  # the steering sweep: not attribution or loss recovered (mmsae/sae/splice.py)
])
def test_editing_a_module_reruns_the_rules_that_import_it(complete, module, rules):
    root, wd, _ = complete
    path = root / module
    text = path.read_text()
    try:
        path.write_text(text + "\n_EDITED = True\n")
        rerun = dry_run(wd, root / "Snakefile").rerun
    finally:
        path.write_text(text)
    rerun.discard("all")
    assert rerun == rules
    rerun = dry_run(wd, root / "Snakefile").rerun
    assert rerun <= {"all"}  # restoring the module restores the state


def test_editing_prose_in_a_module_reruns_nothing(complete):
    """Comments, docstrings and line layout are not code: a rule's code hash leaves them out
    (:func:`mmsae.workflow.script_hash.source_tokens`), so an edit of them keeps hours of training."""
    root, wd, _ = complete
    path = root / "mmsae/sae/trainer.py"
    text = path.read_text()
    doc = text.index('"""') + 3
    try:
        path.write_text(text[:doc] + "Reworded. " + text[doc:] + "\n# a comment\n")
        rerun = dry_run(wd, root / "Snakefile").rerun
    finally:
        path.write_text(text)
    assert rerun <= {"all"}
