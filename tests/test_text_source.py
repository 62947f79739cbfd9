"""corpus.text_source: cleanup, passages, slices, ids, answer-role tokens, and the corpus builder."""

import copy
from pathlib import Path

import pytest
import torch
import yaml
from snakemake.utils import validate

from mmsae.workflow.config_check import config_errors

from mmsae.data import build_corpus, list_images
from mmsae.data.text_source import CHARS_PER_TOKEN, passages, prose_paragraphs, source_documents, text_samples
from mmsae.models import load_subject_model, prepare_inputs, token_roles

RST = """Assignment statements
*********************

Assignment statements are used to (re)bind names to values and to
modify attributes of *mutable* objects:

   assignment_stmt ::= (target_list "=")+ (starred_expression | yield_expression)
   target_list     ::= target ("," target)* [","]

The rules are:

* If the target list is a single target, the object is
  assigned to that target.

* Else the object must be an iterable (**PEP 3132**).

   >>> x = [1, 2]
   >>> x
   [1, 2]

   class Meta(type):
       def __new__(mcs, name, bases, ns, **kw):
           return super().__new__(mcs, name, bases, ns)

+------------+-----------+
| Operation  | Result    |
+============+===========+
| "x + y"    | sum       |
+------------+-----------+

object.__init__(self[, ...])

   Called after the instance has been created, but before it is
   returned to the caller.
"""


def source(**kw):
    """A complete text_source section (what the schema's defaults make of a config)."""
    return {"name": "python-topics", "path": None, "max_tokens": None, "skip_tokens": 0, "passage_tokens": 256,
            "as": "user", "prompt": "Tell me about a topic from the Python documentation.", **kw}


def test_cleanup_keeps_prose_unwrapped_and_drops_markup_grammar_code_and_tables():
    assert prose_paragraphs(RST) == [
        "Assignment statements",
        "Assignment statements are used to (re)bind names to values and to modify attributes of mutable objects:",
        "The rules are:",
        "* If the target list is a single target, the object is assigned to that target.",
        "* Else the object must be an iterable (PEP 3132).",
        "Called after the instance has been created, but before it is returned to the caller.",
    ]


def test_passages_are_deterministic_paragraph_aligned_and_bounded():
    docs = source_documents(source())
    a, b = passages(docs, 200), passages(docs, 200)
    assert a == b and len(a) > 300
    # whole paragraphs: every passage is a run of cleaned paragraphs (or sentences of an over-long one)
    paragraphs = {p for _, text in docs for p in prose_paragraphs(text)}
    first = a[0][0].split("\n\n")
    assert all(p in paragraphs for p in first)
    # the bound holds except for a single sentence longer than it (rare)
    over = [n for _, n in a if n > 200]
    assert len(over) <= len(a) // 50
    assert sum(n for _, n in a) > 60_000  # the whole python-topics prose: about 80k tokens on CPython 3.11


def test_slices_are_disjoint_respect_max_tokens_and_keep_stable_unique_ids():
    whole = text_samples(source())
    train = text_samples(source(max_tokens=5000))
    interp = text_samples(source(max_tokens=2000, skip_tokens=5000))
    ids = [s.sample_id for s in whole]
    assert len(set(ids)) == len(ids) and all(i.startswith("text-python-topics-") for i in ids)
    assert not {s.sample_id for s in train} & {s.sample_id for s in interp}
    assert not {s.prompt for s in train} & {s.prompt for s in interp}
    by_id = {s.sample_id: s for s in whole}
    assert all(by_id[s.sample_id] == s for s in train + interp)  # ids and texts do not depend on the slice
    # interpret starts right after the train slice (5000 estimated tokens, in whole passages)
    assert ids.index(interp[0].sample_id) == ids.index(train[-1].sample_id) + 1
    for sl, cap in ((train, 5000), (interp, 2000)):
        est = sum(-(-len(s.prompt) // CHARS_PER_TOKEN) for s in sl)
        assert cap - 2 * 256 <= est <= cap  # tolerance: whole passages of at most passage_tokens (a rare long sentence: 2x)


def test_estimate_is_close_to_smollm2_tokens(tiny_llava_dir):
    subject = load_subject_model(tiny_llava_dir)
    tok = subject.tokenizer
    samples = text_samples(source(max_tokens=20_000))
    exact = sum(len(tok(s.prompt, add_special_tokens=False)["input_ids"]) for s in samples)
    assert 0.85 * 20_000 <= exact <= 1.1 * 20_000  # characters / 4.4 within ~10% of SmolLM2's count
    with_tok = text_samples(source(max_tokens=3000), tokenizer=tok)
    assert sum(len(tok(s.prompt, add_special_tokens=False)["input_ids"]) for s in with_tok) <= 3000


def test_assistant_passages_are_answer_role_tokens(tiny_llava_dir):
    subject = load_subject_model(tiny_llava_dir)
    tok = subject.tokenizer
    samples = text_samples(source(max_tokens=1500, skip_tokens=3000, **{"as": "assistant"}))
    assert samples and all(s.prompt == source()["prompt"] and s.image_path is None for s in samples)
    for s in samples:
        (role, passage), = s.turns
        assert role == "assistant"
        ids = prepare_inputs(subject, [(s, None)])["input_ids"][0]
        roles = token_roles(subject, s, ids)
        answer = ids[torch.as_tensor(roles == "assistant")].tolist()
        assert answer == tok(passage, add_special_tokens=False)["input_ids"]
    user = text_samples(source(max_tokens=1500, skip_tokens=3000))
    assert [u.prompt for u in user] == [s.turns[0][1] for s in samples]
    ids = prepare_inputs(subject, [(user[0], None)])["input_ids"][0]
    assert (token_roles(subject, user[0], ids) == "user").all()


def test_build_corpus_appends_text_source_and_the_listing_ignores_it(tmp_path):
    base = {"source": "skimage", "names": ["chelsea"], "prompts": ["a"], "text_prompts": ["t"]}
    text = text_samples(source(max_tokens=4000))
    s = build_corpus({**base, "text_source": source(max_tokens=4000)})
    assert len(s) == 2 + len(text) and s[2:] == text
    assert len(build_corpus({**base, "text_source": None})) == 2
    assert list_images({**base, "text_source": source(max_tokens=4000)}, None).num_rows == 1
    (tmp_path / "book.txt").write_text("A first paragraph of prose.\n\nA second one, also prose.\n")
    f = build_corpus({**base, "text_source": source(name="file", path="book.txt")}, base_dir=tmp_path)
    assert [x.prompt for x in f[2:]] == ["A first paragraph of prose.\n\nA second one, also prose."]
    assert f[2].sample_id == "text-file-00000"


@pytest.mark.parametrize("change,match", [
    ({"name": "wiki"}, "text_source.name"),
    ({"as": "system"}, "text_source.as"),
    ({"skip_tokens": -1}, "text_source.skip_tokens"),
    ({"max_tokens": 0}, "text_source.max_tokens"),
    ({"name": "file"}, "text_source.path"),
    ({"extra": 1}, "unknown keys"),
])
def test_bad_sections_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        text_samples(source(**change))


def test_missing_file_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_source.path"):
        text_samples(source(name="file", path=str(tmp_path / "none.txt")))


def test_config_check_names_a_missing_text_file_before_any_job(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    base = yaml.safe_load((repo / "config.yaml").read_text())
    base["model"]["source"] = str(tmp_path)  # no config.json: the hook point is not checked
    for ts, expect in (({"name": "file"}, "corpus.train.text_source.path is required"),
                       ({"name": "file", "path": "none.txt"}, "corpus.train.text_source.path='none.txt': no such file"),
                       ({"name": "python-topics", "max_tokens": 100}, None)):
        cfg = copy.deepcopy(base)
        cfg["corpus"]["train"]["text_source"] = ts
        validate(cfg, str(repo / "config/schema.yaml"))
        errors = config_errors(cfg, tmp_path)
        assert any(expect in e for e in errors) if expect else not errors, errors
