"""Loss recovered with the SAE spliced in (mmsae.interventions.loss_recovered): exact bounds (an identity SAE recovers
1 with KL 0, a zero SAE recovers 0), next-token alignment against Hugging Face's own shifted loss, the
answer tokens against the tokenizer, and the report's table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from report_inputs import inputs

from mmsae.data.corpus import Sample
from mmsae.interventions.loss_recovered import loss_recovered, scored_positions, select_samples
from mmsae.models import ActivationCapture, prepare_inputs, resolve_hook_point, token_roles
from mmsae.report.page import ReportInputs, build_report
from mmsae.sae.model import TopKSAE

HOOK = "model.language_model.layers.1"
ANSWER = "Paris is the capital of France."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(d / "a.png")
    return [Sample("img-a-p0", "Describe this image.", str(d / "a.png"), "a.png"),
            Sample("row-000000", "What is the capital of France?", None, None, (("assistant", ANSWER),)),
            Sample("txt-0000", "Write a short poem about the ocean at night.", None),
            Sample("txt-0001", "Not held out.", None)]


HELD = ["img-a-p0", "row-000000", "txt-0000"]


def identity_sae(d: int) -> TopKSAE:
    """x_hat == x exactly: W_enc = [I, -I], W_dec = [I; -I], zero biases, k = d_sae, so that
    ReLU(x) - ReLU(-x) = x (products by 1 and 0 only)."""
    sae = TopKSAE(d, 2 * d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae


def run(subject, corpus, sae, held=HELD, keep_special=True):
    return loss_recovered(subject, sae, corpus, held, HOOK, keep_special=keep_special, max_samples=None, max_image_pixels=None)


def test_identity_sae_recovers_everything(subject, corpus):
    d = subject.model.config.text_config.hidden_size
    for keep_special in (True, False):
        out = run(subject, corpus, identity_sae(d), keep_special=keep_special)
        for part in ("text", "answer"):
            r = out[part]
            assert r["n_tokens"] > 0
            assert r["ce_zero"] != pytest.approx(r["ce_clean"], abs=1e-3)  # ablating the layer matters
            assert r["ce_sae"] == r["ce_clean"]
            assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-12)
            assert r["ce_loss_recovered_mean"] == pytest.approx(1.0, abs=1e-12)
            assert r["kl_div"] == pytest.approx(0.0, abs=1e-9)
            assert r["kl_div_zero"] > 1e-4 and r["kl_div_score"] == pytest.approx(1.0)
    assert out["samples"] == HELD and out["n_mean_ablation_tokens"] > 0 and out["skipped"] == []


def test_zero_sae_recovers_nothing(subject, corpus):
    d = subject.model.config.text_config.hidden_size
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()  # reconstruction = b_dec = 0 at every spliced position
    out = run(subject, corpus, sae)
    for part in ("text", "answer"):
        r = out[part]
        assert r["ce_sae"] == r["ce_zero"] and r["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-12)
        assert r["kl_div"] == pytest.approx(r["kl_div_zero"])
        assert r["ce_loss_recovered_mean"] != pytest.approx(0.0, abs=1e-3)  # the mean is not zero


def test_mean_sae_recovers_nothing_against_mean_ablation(subject, corpus):
    """An SAE whose reconstruction is the held-out mean of the layer equals mean ablation: the mean is
    taken over the same tokens that are replaced (computed here independently, with a capture hook)."""
    special = subject.special_token_ids
    acts = []
    with ActivationCapture(resolve_hook_point(subject.model, HOOK), stop=True) as cap:
        for s in corpus[:3]:
            img = Image.open(s.image_path).convert("RGB") if s.image_path else None
            inputs = prepare_inputs(subject, [(s, img)])
            x = cap.run(subject.model, **inputs)[0]
            acts.append(x[~torch.isin(inputs["input_ids"][0], torch.tensor(special))])
    mean = torch.cat(acts).double().mean(0).float()
    d = subject.model.config.text_config.hidden_size
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_(), sae.b_dec.copy_(mean)
        sae.b_enc.fill_(-1e9)  # nothing fires: x_hat = b_dec
    out = run(subject, corpus, sae)
    for part in ("text", "answer"):
        r = out[part]
        assert r["ce_sae"] == pytest.approx(r["ce_mean"], rel=1e-5)
        assert r["ce_loss_recovered_mean"] == pytest.approx(0.0, abs=1e-3)


def test_answer_tokens_are_the_tokenizers_encoding_of_the_answer(subject, corpus):
    s = corpus[1]
    ids = prepare_inputs(subject, [(s, None)])["input_ids"][0]
    text, answer = scored_positions(ids.numpy(), token_roles(subject, s, ids), subject.image_token_id, subject.special_token_ids)
    assert ids[answer + 1].tolist() == subject.tokenizer.encode(ANSWER, add_special_tokens=False)
    assert not set(text) & set(answer)
    special = set(subject.special_token_ids)
    assert text.size and not special & set(ids[text].tolist()) | special & set(ids[text + 1].tolist())
    # the prompt's tokens are scored as text: each of them is predicted from its predecessor
    prompt = subject.tokenizer.encode("What is the capital of France?", add_special_tokens=False)
    assert set(prompt[1:]) <= set(ids[text + 1].tolist())


def test_clean_cross_entropy_matches_the_models_own_shifted_loss(subject, corpus):
    """CE_clean on answer tokens equals transformers' loss with labels on the answer only (it shifts
    labels by one itself): an off-by-one alignment fails here."""
    s = corpus[1]
    out = run(subject, corpus, identity_sae(subject.model.config.text_config.hidden_size), held=[s.sample_id])
    inputs = prepare_inputs(subject, [(s, None)])
    ids = inputs["input_ids"][0]
    roles = token_roles(subject, s, ids)
    for part, keep in (("answer", roles == "assistant"), ("text", None)):
        if keep is None:
            text, _ = scored_positions(ids.numpy(), roles, subject.image_token_id, subject.special_token_ids)
            keep = np.zeros(len(ids), bool)
            keep[text + 1] = True
        labels = torch.where(torch.from_numpy(keep), ids, torch.tensor(-100))
        with torch.no_grad():
            ref = subject.model(**inputs, labels=labels[None]).loss.item()
        assert out[part]["n_tokens"] == int(keep.sum())
        assert out[part]["ce_clean"] == pytest.approx(ref, rel=1e-5)


def test_no_answers_gives_a_null_answer_part_with_a_reason(subject, corpus):
    out = run(subject, corpus, identity_sae(subject.model.config.text_config.hidden_size), held=["txt-0000"])
    assert out["answer"] is None and "has an assistant answer" in out["answer_null_reason"]
    assert out["text"]["n_tokens"] > 0 and out["text_null_reason"] is None


def test_unknown_heldout_ids_are_an_error(subject, corpus):
    with pytest.raises(ValueError, match="not in the training corpus"):
        run(subject, corpus, identity_sae(subject.model.config.text_config.hidden_size), held=["img-zzz-p0"])


def test_select_samples_spreads_a_cap_over_the_sorted_ids():
    ids = [f"img-{i}" for i in range(4)] + [f"txt-{i}" for i in range(6)]
    assert select_samples(ids, None) == sorted(ids)
    got = select_samples(ids, 3)
    assert len(got) == 3 and got[0] == "img-0" and got[-1] == "txt-5"


def test_report_shows_the_table_and_the_null_reason(tmp_path):
    result = {"samples": ["a", "b"], "n_heldout_samples": 7, "spliced_positions": "all <b>tokens</b>",
              "text": {"n_tokens": 123, "ce_clean": 2.5, "ce_sae": 2.75, "ce_zero": 9.5, "ce_mean": 6.5,
                       "ce_loss_recovered": 0.9643, "ce_loss_recovered_mean": 0.9375, "kl_div": 0.3125},
              "text_null_reason": None, "answer": None, "answer_null_reason": "no held-out sample has an assistant answer"}
    page = build_report(ReportInputs(**inputs(tmp_path), loss_recovered=result))
    body = page.split("Loss recovered (held-out, spliced SAE)", 1)[1].split("</table>", 1)[0]
    assert "<th>text</th><th>answer</th>" in body
    assert "<td>loss recovered (zero ablation)</td><td>0.9643</td><td>–</td>" in body
    assert "<td>tokens</td><td>123</td><td>–</td>" in body and "<td>CE mean-ablated</td><td>6.5</td>" in body
    assert "answer: no held-out sample has an assistant answer" in page
    assert "all &lt;b&gt;tokens&lt;/b&gt;" in page  # escaped
    assert "Loss recovered (held-out" not in build_report(ReportInputs(**inputs(tmp_path)))
