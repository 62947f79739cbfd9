"""Explanation evaluation: metric code against exact expectations; the real model code paths on tiny
random GroundingDINO / SAM / CLIP built from transformers configs; refinement through a real server."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from mmsae.evaluate.run import Table1Config, score_features, summary_table
from mmsae.evaluate.backends import ClipScorer, GroundedSegmenter, try_load
from mmsae.evaluate.metrics import activated_region, bootstrap_ci, clip_score, iou
from mmsae.evaluate.refine import parse_category, parse_phrase, refine_all
from mmsae.explain import EndpointConfig, Explainer
from mmsae.explain.cache import ResponseCache
from fake_server import FakeEndpoint
from mmsae.codes.schema import CODE_SCHEMA
from mmsae.core.io import write_parquet

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "cat", "dog", "red", "circle", "fur"]


def test_iou_equals_the_set_computation():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.random((13, 17)) < 0.4, rng.random((13, 17)) < 0.3
        sa = {tuple(p) for p in np.argwhere(a)}
        sb = {tuple(p) for p in np.argwhere(b)}
        assert iou(a, b) == pytest.approx(len(sa & sb) / len(sa | sb))
    assert iou(None, a) == 0.0 and iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        iou(np.zeros((2, 2), bool), np.zeros((3, 2), bool))


def test_clip_score_is_torchmetrics_formula():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    expect = 100 * torch.clamp(torch.nn.functional.cosine_similarity(torch.tensor(img), torch.tensor(txt)), min=0)
    np.testing.assert_allclose(clip_score(img, txt), expect.numpy(), rtol=1e-6)
    assert clip_score(img[:1], -img[:1])[0] == 0.0


def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a bilinear (triangle filter, support one source pixel) upsampling,
    written out from the definition: output pixel x samples the input at (x + 0.5) n_in / n_out."""
    centers = (np.arange(n_out) + 0.5) * n_in / n_out
    w = np.clip(1 - np.abs(np.arange(n_in)[None, :] + 0.5 - centers[:, None]), 0, None)
    return w / w.sum(1, keepdims=True)


def _region_by_hand(grid, size, rule):
    """The activated region computed without PIL: 'majority' = upsampled 0/1 mask >= 0.5; 'reference'
    = the released code's 8-bit encoding (inactive 224, active 0), each bilinear pass rounded to 8
    bits, pixels below 224 kept."""
    b = (grid > 0).astype(np.float64)
    wx, wy = _bilinear_weights(grid.shape[1], size[0]), _bilinear_weights(grid.shape[0], size[1])
    if rule == "majority":
        return wy @ b @ wx.T >= 0.5
    rows = np.floor((224 * (1 - b)) @ wx.T + 0.5)
    return np.floor(wy @ rows + 0.5) < 224


def _hand_grids():
    one = np.zeros((24, 24), np.float32)
    one[10, 10] = 2.0
    corner = np.zeros((24, 24), np.float32)
    corner[0, 0] = 0.5
    blocks = np.zeros((8, 8), np.float32)
    blocks[2:4, 2:4], blocks[6, 7], blocks[5, 0] = 1.0, 3.0, 0.1
    ell = np.zeros((8, 8), np.float32)
    ell[1, 1:6], ell[1:7, 5] = 1.0, 1.0
    return [(one, (336, 336)), (corner, (336, 336)), (blocks, (56, 56)), (ell, (56, 88))]


def test_activated_region_both_rules_match_an_independent_computation():
    for grid, size in _hand_grids():
        for rule in ("reference", "majority"):
            got = activated_region(grid, size, 0.0, rule)
            assert got.shape == (size[1], size[0])
            np.testing.assert_array_equal(got, _region_by_hand(grid, size, rule), err_msg=f"{rule} {size}")
    # one active patch of a 24 x 24 grid at 336 px: the released rule reaches 2 patches' width around
    # it (a 28 x 28 square; its 4 corner pixels round back to 224), ours keeps the 120 px >= 0.5
    one, size = _hand_grids()[0]
    assert activated_region(one, size, 0.0, "reference").sum() == 28 * 28 - 4
    assert activated_region(one, size, 0.0, "majority").sum() == 120
    assert not activated_region(one, size, 5.0, "reference").any()
    with pytest.raises(ValueError, match="evaluate.region"):
        activated_region(one, size, 0.0, "half")


def test_bootstrap_ci():
    lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=0)
    assert 1.0 <= lo < 2.5 < hi <= 4.0 and bootstrap_ci([1.0]) == (None, None)


@pytest.mark.parametrize("text,expect", [("Phrase: animal fur", ("animal fur", "ok")), ('"red bus."', ("red bus", "ok")),
                                         ("one two three four five six seven eight nine", (None, "invalid")), ("", (None, "invalid"))])
def test_parse_phrase(text, expect):
    assert parse_phrase(text) == expect


def test_parse_category():
    assert parse_category("It is a colour.") == ("colour", "ok") and parse_category("color") == ("colour", "ok")
    assert parse_category("an animal") == (None, "invalid")


def test_refinement_through_a_real_server(tmp_path):
    with FakeEndpoint(reply="texture", script=[500]) as ep:
        ex = Explainer(EndpointConfig(base_url=ep.base_url, model="r", backoff_s=0.01), ResponseCache(tmp_path / "c.sqlite"))
        rows = refine_all(ex, ex, [(1, "The regions show striped fabric"), (2, "zebra stripes")])
        assert [(r["phrase"], r["category"]) for r in rows] == [("texture", "texture")] * 2
        assert ep.requests == 1 + 2 + 1  # one 500 retried, two phrases, one category (same phrase: cached)


def test_categories_come_from_the_categorizer_endpoint(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    with FakeEndpoint(reply="red fur") as small, FakeEndpoint(reply="It is a material.") as large:
        refiner = Explainer(EndpointConfig(base_url=small.base_url, model="small"), cache)
        categorizer = Explainer(EndpointConfig(base_url=large.base_url, model="large", max_tokens=16), cache)
        rows = refine_all(refiner, categorizer, [(1, "fur of red foxes"), (2, "Unable to produce descriptions")])
        assert [(r["phrase"], r["category"], r["raw_category"]) for r in rows] == [("red fur", "material", "It is a material.")] * 2
        assert small.requests == 2 and large.requests == 1  # phrases by the refiner, the category by the categorizer
        assert large.bodies[0]["model"] == "large" and "red fur" in large.bodies[0]["messages"][0]["content"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (BertTokenizerFast, CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizerFast, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, GroundingDinoProcessor, SamConfig, SamModel, SamProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.manual_seed(0)
    gd = GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config={"model_type": "swin", "image_size": 64, "embed_dim": 16, "depths": [1, 1, 1, 1],
                         "num_heads": [1, 1, 1, 1], "window_size": 2, "out_indices": [2, 3, 4]},
        text_config={"model_type": "bert", "vocab_size": len(WORDS), "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 64},
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
        decoder_attention_heads=2, num_queries=20, num_feature_levels=3, encoder_n_points=2, decoder_n_points=2,
        max_text_len=32, use_timm_backbone=False, backbone=None, use_pretrained_backbone=False))
    gproc = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
                                   tokenizer=BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}))
    sam = SamModel(SamConfig(
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 64, "patch_size": 16,
                       "output_channels": 16, "mlp_dim": 64, "global_attn_indexes": [0], "window_size": 2, "num_pos_feats": 8},
        prompt_encoder_config={"hidden_size": 16, "image_size": 64, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_dim": 32, "iou_head_hidden_dim": 16}))
    sproc = SamProcessor(image_processor=SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                                             mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16}))
    d = tmp_path_factory.mktemp("bpe")
    tk = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["a red cat", "dog fur", "blue circle"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.model.save(str(d))
    merges = [tuple(line.split()) for line in (d / "merges.txt").read_text().splitlines()[1:] if line.strip()]
    ctok = CLIPTokenizerFast(vocab=json.loads((d / "vocab.json").read_text()), merges=merges)
    clip = CLIPModel(CLIPConfig(
        text_config={"vocab_size": ctok.vocab_size + 2, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8}, projection_dim=16))
    cproc = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                          tokenizer=ctok)
    return GroundedSegmenter(gd, gproc, sam, sproc, box_threshold=0.0, text_threshold=0.0, sam_masks="union"), ClipScorer(clip, cproc)


def test_tiny_grounded_sam_and_clip_run_the_real_paths(tiny_models):
    seg, clip = tiny_models
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    boxes = seg.boxes(image, "a cat")
    assert boxes.shape[1] == 4 and len(boxes) > 0
    mask = seg.mask(image, "a cat")
    assert mask.dtype == bool and mask.shape == (50, 70)
    seg.box_threshold = 1.01  # nothing passes: no detection, IoU 0
    assert seg.mask(image, "a cat") is None
    seg.box_threshold = 0.0
    with pytest.raises(ValueError, match="evaluate.sam_masks"):
        GroundedSegmenter(seg.det, seg.det_proc, seg.sam, seg.sam_proc, sam_masks="best")
    e_img, e_txt = clip.embed_images([image, image]), clip.embed_texts(["a red cat"])
    assert e_img.shape == (2, 16) and e_txt.shape == (1, 16)
    assert 0.0 <= clip_score(e_img, e_txt)[0] <= 100.0


def test_sam_mask_is_the_union_of_the_three_candidates_by_default(tiny_models):
    seg, _ = tiny_models
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    boxes = seg.boxes(image, "a cat")
    # by hand: SAM's three candidates per box (its default multimask output), binarised, all united
    inputs = seg.sam_proc(images=image, input_boxes=[[b.tolist() for b in boxes]], return_tensors="pt")
    with torch.no_grad():
        out = seg.sam(**inputs, multimask_output=True)
    cands = seg.sam_proc.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    assert cands.shape[:2] == (len(boxes), 3)
    union = np.zeros((50, 70), bool)
    for b in range(len(boxes)):
        for c in range(3):
            union |= cands[b, c].numpy()
    np.testing.assert_array_equal(seg.mask(image, "a cat"), union)
    single = GroundedSegmenter(seg.det, seg.det_proc, seg.sam, seg.sam_proc, box_threshold=0.0, text_threshold=0.0,
                               sam_masks="single").mask(image, "a cat")
    assert single.shape == union.shape and not np.array_equal(single, union)  # the option is a different mask


def _corpus(tmp_path, n_images=6):
    rng = np.random.default_rng(3)
    images, rows = {}, []
    for s in range(n_images):
        path = tmp_path / f"img{s}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        images[f"s{s}"] = str(path)
        for r in range(4):
            for c in range(4):
                if rng.random() < 0.5:
                    rows.append({"sample_id": f"s{s}", "token_index": r * 4 + c, "modality": "image", "view": 0,
                                 "patch_row": r, "patch_col": c, "feature": int(rng.integers(0, 3)), "activation": float(rng.random())})
    write_parquet(tmp_path / "codes.parquet", pl.DataFrame(rows).to_arrow().cast(CODE_SCHEMA))
    tops = pl.DataFrame({"feature": [0, 0, 1], "modality": ["image"] * 3, "rank": [0, 1, 0], "sample_id": ["s0", "s1", "s2"]})
    refined = pl.DataFrame({"feature": [0, 1, 2], "phrase": ["a cat", "red fur", None], "category": ["object", "texture", None]})
    return images, tops, refined, pl.scan_parquet(tmp_path / "codes.parquet")


def test_scores_baseline_and_table(tmp_path, tiny_models):
    seg, clip = tiny_models
    images, tops, refined, codes = _corpus(tmp_path)
    cfg = dict(n_random=2, iou_trials=2, clip_trials=3, region="reference")
    a = score_features(refined, tops, images, codes, 4, Table1Config(seed=5, **cfg), seg, clip)
    b = score_features(refined, tops, images, codes, 4, Table1Config(seed=5, **cfg), seg, clip)
    c = score_features(refined, tops, images, codes, 4, Table1Config(seed=6, **cfg), seg, clip)
    assert a.equals(b) and not a.filter(pl.col("source") == "random")["sample_id"].equals(c.filter(pl.col("source") == "random")["sample_id"])
    assert set(a["feature"]) == {0, 1}  # the feature without a phrase is excluded
    exp = a.filter(pl.col("source") == "explained")
    assert sorted(exp["sample_id"]) == ["s0", "s1", "s2"] and exp["iou"].null_count() == 0
    rnd = a.filter(pl.col("source") == "random")
    assert rnd.filter(pl.col("trial") >= 2)["iou"].null_count() == rnd.filter(pl.col("trial") >= 2).height  # IoU: 2 trials only
    rows, md = summary_table(a, ["object", "texture"], {}, n_boot=50)
    total = rows[-1]
    assert total["category"] == "total" and total["n_features"] == 2
    per_feature = exp.group_by("feature").agg(pl.col("clip_score").mean())["clip_score"]
    assert total["clip_score_explained"] == pytest.approx(per_feature.mean())
    none = score_features(refined, tops, images, codes, 4, Table1Config())
    assert none.height == 0
    _, md = summary_table(none, ["object"], {"iou": "no detector", "clip_score": "no CLIP"})
    assert "unavailable" in md and "no detector" in md


def test_loading_a_missing_model_is_reported_not_replaced(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, why = try_load(lambda: ClipScorer.from_pretrained("openai/clip-vit-base-patch32-not-here"), "clip")
    assert model is None and why.startswith("clip:")
