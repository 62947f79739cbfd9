"""The export rule's pieces: the Neuronpedia records (round trip through our schema written from the
conversion script's field list), the feature logits (against a hand matmul on a tiny model) and the
Hub folder (card metadata, SAELens layout loadable by our load_sae)."""

import json

import jsonschema
import numpy as np
import polars as pl
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from torch import nn

from mmsae.export import logits as lg
from mmsae.export import neuronpedia as npx
from mmsae.export.hub import upload_command, write_hub_folder
from mmsae.export.histograms import feature_histograms
from mmsae.export.run import build_records, feature_logit_tables
from mmsae.sae.io import load_sae, save_sae
from mmsae.sae.model import TopKSAE


def _src():
    return npx.SourceInfo(model_id="demo", source_set="mmsae-topk-64", layer=3, hook_point="model.language_model.layers.3",
                          release="mmsae-demo", hf_repo_id="<user>/<repo>", hf_folder_id="model.language_model.layers.3")


def _planted(tmp):
    """Two features: 7 with two image examples, 9 with one text context; codes over two image samples."""
    (tmp / "maps" / "7").mkdir(parents=True)
    for r in (0, 1):
        Image.fromarray(np.full((8, 8, 3), 40 * r, np.uint8)).save(tmp / "maps" / "7" / f"{r}-highlight.png")
    maps = pl.DataFrame({"feature": [7, 7], "rank": [0, 1], "sample_id": ["imgA", "imgB"], "score": [3.0, 2.0],
                         "highlight": ["7/0-highlight.png", "7/1-highlight.png"],
                         "heatmap": ["7/0-heatmap.png", "7/1-heatmap.png"]})
    contexts = pl.DataFrame({"feature": [9], "rank": [0], "sample_id": ["txt1"], "score": [2.0],
                             "tokens": [["The", " cat", " sat"]], "activations": [[0.0, 2.0, 0.5]], "focus": [1]})
    # every image token carries k=2 latents; feature 7 fires on two of imgA's four patches
    rows = []
    for sid, fires in (("imgA", {1: 3.0, 2: 1.0}), ("imgB", {0: 2.0})):
        for t in range(4):
            r, c = divmod(t, 2)
            rows.append((sid, 10 + t, "image", 0, r, c, 1, 0.5))
            rows.append((sid, 10 + t, "image", 0, r, c, 7, fires[t]) if t in fires else (sid, 10 + t, "image", 0, r, c, 2, 0.1))
    codes = pl.DataFrame(rows, schema=["sample_id", "token_index", "modality", "view", "patch_row", "patch_col", "feature",
                                       "activation"], orient="row")
    stats = pl.DataFrame({"feature": [7, 9], "frequency": [0.3, 0.1], "frequency_image": [0.3, 0.0],
                          "frequency_text": [0.0, 0.1], "max_activation": [3.0, 2.0], "mean_activation": [2.0, 1.2],
                          "n_samples": [2, 1]})
    expl = pl.DataFrame({"feature": [7, 9], "explanation": ["red patches", None], "status": ["ok", "failed"],
                         "explainer_model": ["m", "m"]})
    scoring = pl.DataFrame({"feature": [7, 7, 7], "method": ["detection", "fuzzing", "detection"],
                            "explanation_kind": ["real", "real", "shuffled"],
                            "labels": [[1, 1, 0, 0], [1, 0], [1, 0]], "predictions": [[1, 0, 0, 0], [1, 0], [0, 1]]})
    return maps, contexts, codes, stats, expl, scoring


def _records(tmp):
    maps, contexts, codes, stats, expl, scoring = _planted(tmp)
    W_dec, W_U = torch.randn(16, 4), torch.randn(4, 12)
    tables = feature_logit_tables(W_dec, W_U, None, [7, 9], decode=lambda i: f"tok{i}", k=3)
    hists = feature_histograms(codes.lazy(), [7, 9])
    return build_records(_src(), features=[7, 9], stats=stats, contexts=contexts, maps=maps, maps_dir=tmp / "maps",
                         image_codes=codes, logit_tables=tables, histograms=hists, explanations=expl, scoring=scoring)


def test_neuronpedia_export_round_trips_through_schema(tmp_path):
    feats, acts, expls, images = _records(tmp_path)
    out = tmp_path / "np"
    base = npx.write_export(out, _src(), feats, acts, expls, images, readme="r")
    assert base == out / "demo" / "3-mmsae-topk-64"
    for name in ("release", "model", "sourceset", "source"):
        assert (base / f"{name}.jsonl").is_file()
    assert (base / "features" / "batch-0.jsonl.gz").is_file() and (base / "activations" / "batch-0.jsonl.gz").is_file()
    back = npx.read_export(base)
    schema = npx.load_schema()
    for kind, key in (("features", "feature"), ("activations", "activation"), ("explanations", "explanation"),
                      ("source", "source"), ("release", "release")):
        for r in back[kind]:
            jsonschema.validate(r, {"$ref": f"#/$defs/{key}", "$defs": schema["$defs"]})
    assert back["features"] == feats and back["activations"] == acts and back["explanations"] == expls
    f7 = next(r for r in back["features"] if r["index"] == 7)
    assert f7["frac_nonzero"] == 0.3 and f7["maxActApprox"] == 3.0 and sum(f7["freq_hist_data_bar_heights"]) == 3
    text = next(a for a in back["activations"] if a["index"] == 9)
    assert text["tokens"] == ["The", " cat", " sat"] and text["maxValueTokenIndex"] == 1 and text["qualifyingTokenIndex"] == 1
    img = [a for a in back["activations"] if a["index"] == 7]
    assert img[0]["tokens"] == ["<img v0 r0 c0>", "<img v0 r0 c1>", "<img v0 r1 c0>", "<img v0 r1 c1>"]
    assert img[0]["values"] == [0.0, 3.0, 1.0, 0.0] and img[1]["values"] == [2.0, 0.0, 0.0, 0.0]
    assert (out / img[0]["dataSource"]).is_file()
    (e,) = back["explanations"]
    assert e["description"] == "red patches" and e["scoreV1"] == pytest.approx(0.75) and e["scoreV2"] == 1.0


def test_schema_rejects_a_record_missing_a_field(tmp_path):
    feats, acts, expls, images = _records(tmp_path)
    del acts[0]["values"]
    with pytest.raises(jsonschema.ValidationError, match="activation record 0"):
        npx.write_export(tmp_path / "np", _src(), feats, acts, expls, images, readme="r")
    assert not (tmp_path / "np").exists()


class _TinyLM(nn.Module):
    """A final RMSNorm-like weight and an untied lm_head, where transformers keeps them."""

    def __init__(self, d=4, vocab=6):
        super().__init__()
        self.model = nn.Module()
        self.model.norm = nn.Module()
        self.model.norm.weight = nn.Parameter(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.arange(vocab * d, dtype=torch.float32).reshape(vocab, d) % 5 - 2)

    def get_output_embeddings(self):
        return self.lm_head


def test_top_logits_equal_a_hand_matmul():
    m = _TinyLM()
    W_dec = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]])
    Wl = m.lm_head.weight.tolist()  # (vocab, d)
    g = m.model.norm.weight.tolist()
    for use_norm in (False, True):
        tables = feature_logit_tables(W_dec, lg.unembedding(m), lg.final_norm(m).weight if use_norm else None,
                                      [1, 2], decode=str, k=2)
        for f in (1, 2):
            hand = [sum(W_dec[f, i].item() * (g[i] if use_norm else 1.0) * Wl[v][i] for i in range(4)) for v in range(6)]
            order = sorted(range(6), key=lambda v: -hand[v])
            assert tables[f]["pos_values"] == pytest.approx([hand[v] for v in order[:2]])
            assert tables[f]["neg_values"] == pytest.approx([hand[v] for v in order[::-1][:2]])
            assert set(tables[f]["pos_str"]) == {str(v) for v in order[:2]}


def test_hub_folder_card_parses_and_sae_loads(tmp_path):
    sae = TopKSAE(8, 32, 4)
    hook = "model.language_model.layers.3"
    save_sae(sae, tmp_path / "sae", model_name="llava-hf/llama3-llava-next-8b-hf", hook_point=hook)
    metrics = {"heldout": {"fvu": 0.25, "l0": 4.0}, "tokens_trained": 123456}
    lr = {"text": {"ce_loss_recovered": 0.9}}
    out = write_hub_folder(tmp_path / "hub", sae_dir=tmp_path / "sae", hook_point=hook, release="mmsae-llava",
                           repo_id=None, model="llava-hf/llama3-llava-next-8b-hf", metrics=metrics, loss_recovered=lr,
                           corpus="skimage: 5 photos")
    loaded, cfg = load_sae(out / hook)
    assert torch.equal(loaded.W_dec, sae.W_dec) and cfg["hook_name"] == hook
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "saelens" and card.data.base_model == "llava-hf/llama3-llava-next-8b-hf"
    assert "sparse-autoencoder" in card.data.tags
    for fact in ("d_sae | 32", "k (active latents per token) | 4", "123,456", "0.2500", "0.9000", "skimage: 5 photos",
                 upload_command(None, out)):
        assert fact in card.text, fact
    entry = __import__("yaml").safe_load((out / "pretrained_saes.yaml").read_text())
    rel = entry["mmsae-llava"]
    assert rel["conversion_func"] is None and rel["repo_id"] == "<user>/<repo>"
    assert rel["saes"] == [{"id": hook, "path": hook, "l0": 4.0, "neuronpedia": None, "variance_explained": 0.75}]


def test_image_tokens_without_a_patch_get_a_label():
    """The image-newline tokens (view -2) carry no column in the codes; the default run's export
    stopped on them."""
    from mmsae.export.neuronpedia import image_token_label

    assert image_token_label(0, 3, 5) == "<img v0 r3 c5>"
    assert image_token_label(-2, 3, None) == "<img v-2 r3>" and image_token_label(-2, None, None) == "<img v-2>"


@pytest.mark.parametrize("arch,name", [("topk", "A TopK sparse"), ("batchtopk", "A BatchTopK sparse")])
def test_hub_folder_names_the_architecture_and_loads_in_saelens(tmp_path, arch, name):
    """A BatchTopK SAE is saved as SAELens saves it (jumprelu + threshold): the card must not call it
    TopK, and SAELens loads the Hub folder (the upload's layout) to the same encoder."""
    from mmsae.sae.batchtopk import make_sae

    sae = make_sae(arch, 8, 32, 4, seed=2)
    hook = "model.language_model.layers.3"
    save_sae(sae, tmp_path / "sae", model_name="m", hook_point=hook)
    out = write_hub_folder(tmp_path / "hub", sae_dir=tmp_path / "sae", hook_point=hook, release="r", repo_id=None,
                           model="m", metrics={"heldout": {"fvu": 0.5, "l0": 4.0}}, loss_recovered=None, corpus="c")
    text = ModelCard.load(out / "README.md").text
    assert name in text and ("threshold" in text) == (arch != "topk")
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(out / hook), device="cpu")
    x = torch.randn(5, 8)
    vals, idx = sae.encode(x)
    ours = torch.zeros(5, 32).scatter_add_(1, idx, vals)  # a threshold SAE pads its rows with zeros
    assert torch.allclose(theirs.encode(x), ours, atol=1e-5)
