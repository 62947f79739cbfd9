"""Attribution cost: one forward + one backward for all features (ours) versus the paper's released
code, which loops over features with two forwards and one backward each (the loop below), and versus
``attribution.method: reference`` (the released computation with the clean forward shared: one
forward and one backward per feature).

Needs the default run's model and SAE (run `snakemake --cores all` first). The loop is timed on
--loop-features features and extrapolated to every feature active in the case (what the loop
must visit to rank them all).

    .venv/bin/python bench/attribution_cost.py [--model results/models/demo] [--sae results/sae/default]
"""

import argparse
import json
import time

import torch

from mmsae.interventions.attribution import SAESplice, attribute, logit_diff, reference_attribution
from mmsae.data import Sample
from mmsae.data.corpus import load_image, resolve_image_ref
from mmsae.models import load_subject_model, prepare_inputs, resolve_hook_point
from mmsae.sae import load_sae

def per_feature_loop_cost(model, module, sae, inputs: dict, answer_id: int, baseline_id: int, features: list[int]) -> None:
    """The released code's cost pattern, for timing only: per feature, two forwards and one backward
    (EvolvingLMMs-Lab/multimodal-sae, sae_auto_interp/features/patching/attribution.py,
    ``Attribution.get_attribution``)."""
    for f in features:
        for ablate in (None, f):
            splice = SAESplice(sae, ablate=ablate, track=ablate is None)
            handle = module.register_forward_hook(splice)
            try:
                with torch.enable_grad():
                    m = logit_diff(model, inputs, answer_id, baseline_id)
                    if ablate is None:
                        m.backward()
            finally:
                handle.remove()


CASES = [
    ("text", "What is the capital of France?", None, "The capital of France is", " Paris", " London"),
    ("image", "Is there a cat in this image? Answer Yes or No.", "chelsea", "", "Yes", "No"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="results/models/demo")
    ap.add_argument("--sae", default="results/sae/default")
    ap.add_argument("--hook-point", default="model.language_model.layers.15")
    ap.add_argument("--loop-features", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = load_subject_model(args.model)
    sae, _ = load_sae(args.sae)
    module = resolve_hook_point(s.model, args.hook_point)
    print(f"{'case':>6} {'tokens':>6} {'active':>6} {'ours_s':>8} {'loop_s/feat':>11} {'ref_s/feat':>10} {'loop_all_s':>10} {'speed-up':>8}")
    out = {}
    for name, prompt, image_ref, prefix, answer, baseline in CASES:
        path = resolve_image_ref(image_ref)
        image = load_image(path)[0] if path else None
        inputs = dict(prepare_inputs(s, [(Sample(name, prompt, path), image)], suffix=prefix))
        a = s.tokenizer.encode(answer, add_special_tokens=False)[0]
        b = s.tokenizer.encode(baseline, add_special_tokens=False)[0]
        attribute(s.model, module, sae, inputs, a, b)  # warm-up
        t0 = time.perf_counter()
        res = attribute(s.model, module, sae, inputs, a, b)
        ours = time.perf_counter() - t0
        feats = list(dict.fromkeys(res.features.tolist()))
        t0 = time.perf_counter()
        per_feature_loop_cost(s.model, module, sae, inputs, a, b, feats[: args.loop_features])
        per = (time.perf_counter() - t0) / min(args.loop_features, len(feats))
        t0 = time.perf_counter()
        reference_attribution(s.model, module, sae, inputs, a, b, feats[: args.loop_features])
        ref = (time.perf_counter() - t0) / min(args.loop_features, len(feats))
        total = per * len(feats)
        print(f"{name:>6} {inputs['input_ids'].shape[1]:>6} {len(feats):>6} {ours:>8.3f} {per:>11.3f} {ref:>10.3f} {total:>10.1f} {total / ours:>7.0f}x")
        out[name] = {"tokens": inputs["input_ids"].shape[1], "active": len(feats), "ours_s": ours, "loop_s_per_feature": per,
                     "reference_s_per_feature": ref, "speedup": total / ours}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
