"""Loss recovered beside SAELens's default (#28.7): ``all_positions`` splices every position of the
hooked layer (special tokens included) and scores every next-token prediction. Checked against a
hand-written forward hook that replaces every position's output by the SAE's reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmsae.data.corpus import Sample
from mmsae.extract.forward import image_batches
from mmsae.interventions.loss_recovered import loss_recovered
from mmsae.models import prepare_inputs, resolve_hook_point
from mmsae.report.page import ENV
from mmsae.report.sections import loss_recovered_view
from mmsae.sae.model import TopKSAE

HOOK = "model.language_model.layers.1"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(d / "a.png")
    return [Sample("img-a-p0", "Describe this image.", str(d / "a.png"), "a.png"),
            Sample("row-000000", "What is the capital of France?", None, None, (("assistant", "Paris is."),)),
            Sample("txt-0000", "Write a short poem about the ocean at night.", None)]


def _sae(subject) -> TopKSAE:
    d = subject.model.config.text_config.hidden_size
    sae = TopKSAE(d, 4 * d, 8, seed=3)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return sae


def _by_hand(subject, sae, samples):
    """CE over every next-token prediction, clean and with every position replaced by x_hat."""
    model, module = subject.model, resolve_hook_point(subject.model, HOOK)

    def replace(_m, _i, out):
        x = out[0] if isinstance(out, tuple) else out
        x_hat = sae(x.reshape(-1, x.shape[-1]).float()).x_hat.reshape(x.shape).to(x.dtype)
        return (x_hat, *out[1:]) if isinstance(out, tuple) else x_hat

    sums, n = {"clean": 0.0, "sae": 0.0}, 0
    for (s, img, _), in image_batches(samples, 1, None, []):
        inputs = prepare_inputs(subject, [(s, img)])
        ids = inputs["input_ids"][0]
        for mode in sums:
            handle = module.register_forward_hook(replace) if mode == "sae" else None
            try:
                with torch.no_grad():
                    logits = model(**inputs, use_cache=False).logits[0, :-1].float()
            finally:
                if handle is not None:
                    handle.remove()
            sums[mode] += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        n += len(ids) - 1
    return {m: v / n for m, v in sums.items()}, n


def test_all_positions_ce_matches_a_hand_written_full_splice(subject, corpus):
    sae = _sae(subject)
    held = [s.sample_id for s in corpus]
    out = loss_recovered(subject, sae, corpus, held, HOOK, keep_special=True, max_samples=None, max_image_pixels=None)
    ref, n = _by_hand(subject, sae, corpus)
    a = out["all_positions"]
    assert a["n_tokens"] == n
    assert a["ce_clean"] == pytest.approx(ref["clean"], rel=1e-5)
    assert a["ce_sae"] == pytest.approx(ref["sae"], rel=1e-5)
    assert a["ce_sae"] != pytest.approx(out["text"]["ce_sae"], rel=1e-3)  # a different quantity from ours
    assert out["all_positions_null_reason"] is None and "every position" in out["all_positions_definition"]

    view = loss_recovered_view(out)
    labels = [c["label"] for c in view["columns"]]
    assert labels == ["ours (trained positions; text/answer tokens)"] * 2 + ["SAELens-style (all positions, all tokens)"]
    assert [row[1][2] for row in view["rows"] if row[0] == "CE with the SAE spliced in"] == [a["ce_sae"]]
    html = ENV.get_template("loss_recovered.html.j2").render(loss_recovered=view)
    assert "<th colspan=2>ours (trained positions; text/answer tokens)</th>" in html
    assert "<th colspan=1>SAELens-style (all positions, all tokens)</th>" in html
    assert "<th>text</th><th>answer</th><th>all_positions</th>" in html
