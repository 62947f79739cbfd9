"""The rehearsal (config/rehearsal.yaml, mmsae/rehearsal/, scripts/rehearse.sh): its scripted endpoint
answers each role in the format the workflow parses, its data is LLaVA-NeXT-Data's published schema, its
tiny models have the paper model's layout and load where the paper's would, and the paper command runs
from a clean clone to a report with the banner and a Table 1 of numbers."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import REPO

from mmsae.data import build_corpus, load_image
from mmsae.data.corpus import Sample
from mmsae.evaluate import refine
from mmsae.evaluate import scoring_prompts as sp
from mmsae.explain import prompts as ep
from mmsae.models import load_subject_model, prepare_inputs, token_roles
from mmsae.rehearsal import data, evaluators, server, subject


# ---- the scripted endpoint -------------------------------------------------------------------------

def test_endpoint_answers_each_role_as_its_parser_reads():
    image = ep.image_messages([b"\x89PNG fake 1", b"\x89PNG fake 2"])
    texts = [ep.text_messages([(["a", " cat"], [0.0, 1.0])]), ep.text_messages([(["the", " dog"], [1.0, 0.0])])]
    parsed = [ep.parse_response(server.answer({"messages": m})[0]) for m in [image, *texts]]
    assert all(status in ("ok", "no_explanation") for _, status in parsed)
    assert parsed[0][1] != "ok" or parsed[0][0] in server.IMAGE_CONCEPTS
    many = [ep.parse_response(server.answer({"messages": ep.text_messages([([str(i)], [1.0])])})[0]) for i in range(40)]
    assert {s for _, s in many} == {"ok", "no_explanation"}  # both paths of the workflow are taken
    phrase, status = refine.parse_phrase(server.answer({"messages": [{"role": "user", "content": refine.REFINE_PROMPT.format(
        explanation="the rocket body")}]})[0])
    assert (phrase, status) == ("the rocket body", "ok")
    category = server.answer({"messages": [{"role": "user", "content": refine.CATEGORY_PROMPT.format(phrase="cat fur")}]})[0]
    assert refine.parse_category(category) == ("texture", "ok")
    for method in ("detection", "fuzzing"):
        batch = sp.text_messages(method, "cats", ["a cat", "a dog", "the sea"], mode="batch")
        preds, status = sp.parse_predictions(server.answer({"messages": batch})[0], 3)
        assert status == "ok" and len(preds) == 3
        shown = sp.image_messages(method, "cats", [b"x", b"y"], mode="batch")
        assert sp.parse_predictions(server.answer({"messages": shown})[0], 2)[1] == "ok"
        one = sp.text_messages(method, "cats", ["a cat"], mode="logprob")
        text, probs = server.answer({"messages": one, "logprobs": True, "top_logprobs": 5})
        assert sp.parse_single(text) in (0, 1) and abs(sum(probs.values()) - 1) < 1e-9
    assert server.answer({"messages": batch}) == server.answer({"messages": batch})  # deterministic


def test_endpoint_serves_openai_chat_completions_with_logprobs():
    srv = server.serve()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        assert json.load(urllib.request.urlopen(f"{base}/health"))["status"] == "ok"
        body = {"model": "m", "messages": sp.text_messages("detection", "cats", ["a cat"], mode="logprob"),
                "logprobs": True, "top_logprobs": 5}
        req = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        out = json.load(urllib.request.urlopen(req))
        choice = out["choices"][0]
        assert choice["message"]["content"] in ("0", "1")
        assert 0 <= sp.probability_of_one(choice["logprobs"]["content"]) <= 1
    finally:
        srv.shutdown()
        srv.server_close()


# ---- data ------------------------------------------------------------------------------------------

def test_data_is_llava_next_data_as_published(tmp_path):
    out = data.build(tmp_path)
    files = sorted(out["train"].glob("*.parquet"))
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    table = pq.read_table(files)
    assert table.schema.equals(data.schema())
    assert sum(r is None for r in table.column("image").to_pylist()) == len(data.TEXT_CONVERSATIONS)
    samples = build_corpus({"source": "table", "path": str(out["train"])})
    with_image = [s for s in samples if s.image_path]
    assert len(with_image) == len(data.IMAGE_CONVERSATIONS) and len(samples) - len(with_image) == len(data.TEXT_CONVERSATIONS)
    assert load_image(with_image[0].image_path)[1] == "ok"
    assert any(len(s.turns) == 3 for s in samples)  # two rounds
    assert sorted(p.name for p in out["interpret"].iterdir()) == sorted(data.INTERPRET_FILES)  # images only
    stamp = (out["train"] / files[0].name).stat().st_mtime_ns
    data.build(tmp_path)  # idempotent: kept, not rewritten
    assert (out["train"] / files[0].name).stat().st_mtime_ns == stamp


# ---- the Llama-3 chat format: answer tokens (a bug the rehearsal found) ------------------------------

def test_answer_tokens_are_found_under_the_llama3_llava_next_template(tiny_llava_dir):
    """The published template opens every text part with a newline, also the assistant's: the answer's
    tokens follow the generation prompt and that newline. Before, token_roles raised for every
    LLaVA-NeXT-Data conversation under the paper's model."""
    s = load_subject_model(tiny_llava_dir)  # its own copy: the chat template and special tokens are replaced
    s.processor.chat_template = subject.CHAT_TEMPLATE
    s.tokenizer.add_tokens([subject.HEADER_START, subject.HEADER_END, subject.EOT], special_tokens=True)  # as Llama-3's
    sample = Sample(sample_id="c", prompt="What is 12 times 7?", image_path=None, image_key=None,
                    turns=(("assistant", "It is 84."), ("user", "And 12 times 8?"), ("assistant", "96.")))
    ids = prepare_inputs(s, [(sample, None)])["input_ids"][0]
    roles = token_roles(s, sample, ids)
    tok = s.tokenizer
    answers = ids[torch.as_tensor(roles == "assistant")].tolist()
    assert answers == tok("It is 84.", add_special_tokens=False)["input_ids"] + tok("96.", add_special_tokens=False)["input_ids"]


def test_an_empty_answer_marks_no_tokens_and_raises_nothing(tiny_llava_dir):
    """A blank ``gpt`` value (the table reader keeps it as an empty assistant turn) has no tokens; the
    conversation's other answers are still marked."""
    s = load_subject_model(tiny_llava_dir)
    sample = Sample(sample_id="e", prompt="Q?", image_path=None, image_key=None,
                    turns=(("assistant", ""), ("user", "And?"), ("assistant", "96.")))
    ids = prepare_inputs(s, [(sample, None)])["input_ids"][0]
    answers = ids[torch.as_tensor(token_roles(s, sample, ids) == "assistant")].tolist()
    assert answers == s.tokenizer("96.", add_special_tokens=False)["input_ids"]


# ---- the tiny models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    return root, subject.build(root / subject.DIR), evaluators.build_all(root), data.build(root)


def test_subject_has_the_paper_models_layout(built):
    root, path, _, out = built
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert cfg["image_grid_pinpoints"] == subject.PINPOINTS and cfg["vision_feature_layer"] == -2
    assert cfg["vision_feature_select_strategy"] == "default" and cfg["text_config"]["num_hidden_layers"] == 32
    assert cfg["vision_config"]["image_size"] == 336 and cfg["vision_config"]["patch_size"] == 14
    assert cfg["text_config"]["vocab_size"] % 64 == 0 and cfg["tie_word_embeddings"] is False
    s = load_subject_model(path, dtype="bfloat16", device="cpu")
    assert s.tokenizer.convert_ids_to_tokens(s.image_token_id) == "<image>"
    for word in (" Paris", " London", "Yes", "No"):  # config/rehearsal.yaml's attribution answers: one token each
        assert len(s.tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    sample = next(x for x in build_corpus({"source": "table", "path": str(out["train"])}) if x.image_path)
    image = load_image(sample.image_path)[0]
    text = s.processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                           add_generation_prompt=True, tokenize=False)
    assert text == ("<|start_header_id|>user<|end_header_id|>\n\n<image>\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    inputs = prepare_inputs(s, [(sample, image)])
    assert tuple(inputs["pixel_values"].shape[1:]) == (5, 3, 336, 336)  # base view + a 2x2 anyres grid
    ids = inputs["input_ids"][0]
    assert ids[0] == s.tokenizer.bos_token_id and (ids == s.image_token_id).sum() > 4 * 576
    roles = token_roles(s, sample, ids)
    assert (roles == "assistant").sum() > 0
    before = (path / "model.safetensors").stat().st_mtime_ns
    subject.build(path)  # idempotent
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def test_evaluation_models_load_as_the_papers_would(built, monkeypatch):
    from mmsae.evaluate.backends import ClipScorer, GroundedSegmenter
    from mmsae.workflow.config_load import missing_models

    root, _, models, out = built
    image = load_image(str(out["interpret"] / "chelsea.png"))[0]
    seg = GroundedSegmenter.from_pretrained(str(models["detector"]), str(models["segmenter"]), sam_masks="union")
    mask = seg.mask(image, "cat fur")
    assert mask is not None and mask.shape == (image.size[1], image.size[0])
    clip = ClipScorer.from_pretrained(str(models["clip"]))
    assert clip.embed_images([image]).shape == clip.embed_texts(["cat fur"]).shape == (1, evaluators.WIDTH)
    monkeypatch.chdir(root)  # config/rehearsal.yaml's paths are relative to the working directory
    ev = yaml.safe_load((REPO / "config/rehearsal.yaml").read_text())["evaluate"]
    cfg = {"evaluate": {"detector": ev["detector"], "segmenter": ev["segmenter"], "clip": ev["clip"], "clip_backend": "transformers"}}
    assert missing_models(cfg, cache_dir=root / "empty-cache") == []


# ---- the report's banner ----------------------------------------------------------------------------

def test_report_shows_the_banner_escaped_and_only_when_set(tmp_path):
    from report_inputs import EVIL, inputs

    from mmsae.report.page import ReportInputs, build_report

    kw = inputs(tmp_path)
    page = build_report(ReportInputs(**{**kw, "run": {**kw["run"], "banner": f"Random weights {EVIL}"}}))
    assert "id=banner" in page and "Random weights" in page and EVIL not in page
    assert "id=banner" not in build_report(ReportInputs(**{**kw, "run": {**kw["run"], "banner": None}}))


# ---- the overlay -------------------------------------------------------------------------------------

def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


# what config/rehearsal.yaml may set: model ids and directories, sizes, data paths, endpoints, the stages
# the paper config leaves off (switched on, small) and the report's banner
OVERLAY_MAY_SET = re.compile(r"^(model\.source|corpus\.train\.path|extract\.shard_tokens|sae\.(d_sae|k|steps|batch_size|"
                             r"warmup_steps|lr_decay_steps|dead_tokens|buffer_tokens|heldout_max_tokens|checkpoint_every)|"
                             r"features\.select\.(mode|n|min_samples)|explain\.(base_url|model|chunks)|"
                             r"evaluate\.(refiner|categorizer)\.(base_url|model)|evaluate\.(detector|segmenter|clip)|"
                             r"loss_recovered\.max_samples|(steer|attribution|neurons)\..*|report\.banner)$")


def test_overlay_changes_only_ids_sizes_paths_and_endpoints():
    overlay = yaml.safe_load((REPO / "config/rehearsal.yaml").read_text())
    paper = yaml.safe_load((REPO / "config/llava-next-8b.yaml").read_text())
    assert [k for k in _leaves(overlay) if not OVERLAY_MAY_SET.match(k)] == []
    assert overlay["features"]["select"]["mode"] == paper["features"]["select"]["mode"]
    assert overlay["features"]["select"]["min_samples"] == paper["features"]["select"]["min_samples"]


# ---- the whole rehearsal -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.workflow
def test_rehearsal_runs_the_paper_command_from_a_clean_clone(tmp_path):
    """scripts/rehearse.sh from a fresh clone of the committed checkout: the tiny models and data are
    built, the paper command runs every stage, and the report carries the banner and a Table 1 of numbers."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    wd = tmp_path / "wd"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.run([str(clone / "scripts/rehearse.sh"), str(wd)], cwd=clone, env=env, capture_output=True,
                          text=True)
    wall = time.monotonic() - start
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    print(f"rehearsal wall time: {wall:.0f} s (load average {os.getloadavg()[0]:.1f})")
    (report,) = wd.glob("results/**/report/index.html")
    html = report.read_text()
    banner = yaml.safe_load((clone / "config/rehearsal.yaml").read_text())["report"]["banner"]
    assert "id=banner" in html and banner.split(":")[0] in html
    total = re.search(r"<tr><td>total</td><td>(\d+)</td><td>(\d\.\d{3})", html[html.index("id=evaluation"):])
    assert total and int(total.group(1)) > 0, "Table 1 has no numbers"
    for section in ("id=scoring", "id=steering", "id=attribution", "id=neurons"):
        assert section in html
    assert list(wd.glob("results/**/export/hub")) and list(wd.glob("results/**/export/neuronpedia"))
    (export_log,) = wd.glob("results/**/logs/export.log")
    assert "bfloat16) on cpu" in export_log.read_text()  # model.dtype, not float32 (~32 GB for the paper's 8B)
    shutil.rmtree(wd / "models", ignore_errors=True)  # ~40 MB
