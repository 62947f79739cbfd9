"""Hand-made inputs for every report section (old and new output formats), shared by
tests/test_report.py and the screenshot check."""

from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

EVIL = "<script>alert('x')</script>"


def _png(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    arr = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path.name


def inputs(tmp: Path, new: bool = True) -> dict:
    """Keyword arguments of build_report; ``new``: with the newer keys (token norms, held-out ids,
    steering verdicts, causal sweep, attribution validation table), else the older outputs."""
    tmp.mkdir(parents=True, exist_ok=True)
    maps = pl.DataFrame({"feature": [7, 7], "rank": [0, 1], "sample_id": [f"img{EVIL}", "img-2"], "score": [3.5, 2.25],
                         "highlight": [_png(tmp / "h0.png", 0), _png(tmp / "h1.png", 1)],
                         "heatmap": [_png(tmp / "m0.png", 2), _png(tmp / "m1.png", 3)]})
    contexts = pl.DataFrame({"feature": [9], "rank": [0], "tokens": [["<image>", "<image>", "The", " cat", " & ", "dog"]],
                             "activations": [[0.0, 0.0, 0.1, 2.0, 0.0, 1.0]], "focus": [3]})
    stats = pl.DataFrame({"feature": [7, 9], "frequency": [0.01, 0.002], "frequency_image": [0.02, 0.0],
                          "frequency_text": [0.0, 0.01], "max_activation": [3.5, 2.0], "mean_activation": [1.0, 0.7],
                          "n_samples": [12, 4]})
    explanations = pl.DataFrame({"feature": [7, 9], "explainer_model": ["/m/Qwen2-VL", "/m/Qwen2-VL"],
                                 "prompt_version": ["v3", "v3"], "explanation": [f"red circles {EVIL}", None],
                                 "raw_response": ["[EXPLANATION]: red circles", "oops <b>"], "status": ["ok", "failed"],
                                 "error": [None, "HTTP 503: scripted"]})
    metrics = {"d_sae": 64, "k": 4, "steps": 10, "batch_size": 32,
               "heldout": {"fvu": 0.31, "fvu_image": 0.4, "fvu_text": 0.2, "l0": 4.0, "n_tokens": 1000},
               "dead_fraction": 0.1}
    steer_cols = {"feature": [9, 9, 9, 9], "prompt": ["Tell me & more"] * 4, "image": [None] * 4,
                  "mode": ["error_kept"] * 4, "positions": ["all"] * 4, "text_before": ["I went out."] * 4,
                  "value": [2.0, 5.0, 10.0, 20.0], "scale": ["max_multiple"] * 4, "clamp_value": [4.0, 10.0, 20.0, 40.0],
                  "changed": [False, True, True, True], "text_after": ["I went out.", "Cats <3 cats.", "cat cat cat cat", "The stock market"]}
    if new:
        steer_cols |= {"ppl_before": [10.0, 10.0, 10.0, 10.0], "ppl_after": [10.0, 15.0, 90.0, 12.0],
                       "toward_feature": [False, True, True, False], "success": [False, True, False, False],
                       "control_features": [[], [3, 7], [3, 7, 8, 11], [3, 7]], "control_toward": [None, 0.5, 0.25, 1.0],
                       "control_success": [None, 0.0, 0.25, 0.5], "special_tokens_steered": [False] * 4}
    case = {"case": "color", "answer": "red", "baseline": "blue", "image": "/x/rocket.png", "prompt": "What colour?",
            "metric": 1.234, "feature_attribution": 1.0, "error_attribution": 0.2, "pool": "sum",
            "seconds": {"attribution": 0.5, "ablation_per_feature": 0.3},
            "top_image": [{"feature": 7, "attribution": 0.8}], "top_text": [{"feature": 9, "attribution": -0.1}],
            "maps": [{"png": _png(tmp / "a0.png", 4), "feature": 7, "view": 0, "sum": 0.8}],
            "text_tokens": ["What", " colour", "?"], "text_attribution": [0.1, -0.3, 0.05]}
    if new:
        case |= {"special_tokens_spliced": False, "n_positions_unspliced": 5}
    case["validation"] = ({"ours": {"pearson_r": 0.91, "sign_agreement": 0.875, "n_features": 8},
                           "reference": {"pearson_r": 0.88, "sign_agreement": 0.75, "n_features": 8}}
                          if new else {"pearson": 0.9, "features": [7, 9]})
    props = {"n_cases": 2, "semantic_sensitivity": 0.5, "specificity_overlap": 0.1, "invariance_overlap": 0.3,
             "maps": [{"case": "c0", "layer": 3, "neuron": 17, "png": _png(tmp / "n0.png", 5), "mask_png": _png(tmp / "n1.png", 6)}]}
    if new:
        props |= {"causal_sweep": [{"scale": s, "noun_prob_drop_top": 0.1 * s, "noun_prob_drop_random": 0.01 * s,
                                    "fluency_change_top": 0.5 * s, "fluency_change_random": 0.4 * s} for s in (1.0, 2.0, 4.0)],
                  "causal_scale": 2.0, "causal_at_scale": {"noun_prob_drop_top": 0.2, "noun_prob_drop_random": 0.02}}
    else:
        props |= {"noun_removed_rate_top": 0.4, "noun_removed_rate_random": 0.05}
    neurons = {
        "props": props,
        "captions": pl.DataFrame({"sample": ["s0"], "caption": ["a dog on grass"], "nouns": [["dog", "grass"]]}),
        "neurons": pl.DataFrame({"sample": ["s0", "s0"], "case": ["c0", "c0"], "noun": ["dog", "dog"], "layer": [3, 5],
                                 "neuron": [17, 2], "score": [1.5, 1.2], "rank": [0, 1]}),
        "tokens": pl.DataFrame({"layer": [3, 3], "neuron": [17, 17], "token": ["dog", "puppy"]}),
        "edits": pl.DataFrame({"name": ["e0"], "status": ["ok"], "source": ["dog"], "target": ["cat"], "method": ["adam"],
                               "caption_after": ["a cat on grass"], "success": [True], "generality": [0.5],
                               "n_generality": [4], "locality": [0.9]}),
        "neuron_dir": tmp,
    }
    evaluation = {"unavailable": {"clip_score": "no CLIP weights offline"}, "n_with_phrase": 3, "n_refined": 4,
                  "table": [{"category": "all", "n_features": 3, "iou_explained": 0.42, "iou_ci": [0.3, 0.5],
                             "iou_random": 0.1, "iou_random_std": 0.02}]}
    out = dict(
        manifest={"hook_point": "model.layers.4", "layer": 4, "d_model": 576, "n_samples": 20, "n_tokens": 5000,
                  "n_image_tokens": 3000, "n_text_tokens": 2000, "n_shards": 2, "n_images_converted": 1,
                  "skipped": [{"image": f"bad{EVIL}.jpg", "reason": "truncated"}]},
        metrics=metrics,
        log=pl.DataFrame({"step": [0, 5, 10], "fvu": [1.0, 0.5, 0.3], "fvu_image": [1.1, 0.6, 0.4], "fvu_text": [0.9, 0.4, 0.2]}),
        stats=stats,
        selected={"features": [7, 9], "info": {"mode": "most_frequent", "n_alive": 40, "n_too_few_samples": 3,
                                                "min_samples": 3, "n_too_dense": 0}},
        maps=maps, contexts=contexts, maps_dir=tmp,
        run={"model": "demo", "demo": True, "provenance": None},
        explanations=explanations, steering=pl.DataFrame(steer_cols), attribution={"cases": [case]},
        attribution_dir=tmp, neurons=neurons, evaluation=evaluation,
    )
    if new:
        metrics |= {"token_norms": {"all": {"median": 12.5, "p99": 40.0, "max": 310.0},
                                    "image": {"median": 20.0, "p99": 45.0, "max": 310.0},
                                    "text": {"median": 8.0, "p99": 30.0, "max": 60.0}},
                    "fvu_including_excluded": 0.45, "n_excluded_tokens": 17}
        out["heldout_ids"] = ["s1", "s2", "s3"]
        out["log"] = out["log"].with_columns(l0=pl.Series([40.0, 8.0, 4.0]), dead_fraction=pl.Series([0.0, 0.05, 0.1]),
                                             aux_loss=pl.Series([0.0, 0.8, 0.5]), lr=pl.Series([1e-4, 2e-4, 0.0]))
        out["activation_histograms"] = {7: ([0.5, 1.5, 2.5, 3.5], [6, 3, 2, 1]), 9: ([0.25, 0.75, 1.25, 1.75], [2, 1, 0, 1])}
        out["logits"] = {f: {"pos": [(" cat", 2.5), (" kitten", 2.25), (EVIL, 1.5)], "neg": [(" the", -1.75), ("\n", -1.5)]}
                         for f in (7, 9)}
    return out
