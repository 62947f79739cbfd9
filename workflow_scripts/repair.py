"""Entry point of rule repair: per configured case, attribution ranks the features behind the wrong answer;
ablating the top text features / clamping up the top image features, beside matched random controls, is
judged by whether the greedy answer flips to the correct one and stays fluent."""

import pyarrow as pa

from mmsae.interventions.loading import load_model_with_sae
from mmsae.core.io import write_parquet
from mmsae.core.job import setup
from mmsae.data.corpus import resolve_image_ref
from mmsae.interventions.repair import RepairConfig, repair_case
from mmsae.interventions.repair_tally import tally
from mmsae.sae import trained_without_special_tokens

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
p, section = sm.params, sm.params.repair
m = load_model_with_sae(p.model, p.dtype, p.device, sm.input.cfg, p.hook_point)  # the hook point travels with the SAE
subject, sae, sae_cfg, hook_point, module = m.subject, m.sae, m.sae_cfg, m.hook_point, m.module
cfg = RepairConfig.from_config(section, keep_special=trained_without_special_tokens(sae_cfg))
rows = []
for i, case in enumerate(section["cases"]):
    case_rows = repair_case(subject, module, sae, {**case, "image": resolve_image_ref(case.get("image"))}, cfg, i)
    t = tally(case_rows)[case["name"]]
    first = t["first_success"]
    log.info("case %s: answer %r (wrong %r, correct %r, logit diff %.3f); %d interventions, %d repaired it; "
             "control %s successes per draw (%d draws); first success: %s", case["name"], case_rows[0]["answer_before"],
             case["wrong"], case["correct"], case_rows[0]["metric"], t["n_trials"], t["successes"],
             "-" if t["control_successes"] is None else f"{t['control_successes']:.2f}", t["control_draws"],
             "none" if first is None else f"{first['kind']} of {first['features']} at {first['value']:g} -> {first['answer_after']!r}")
    rows += case_rows
floats = pa.list_(pa.float64())
schema = pa.schema([("case", pa.string()), ("prompt", pa.string()), ("image", pa.string()), ("wrong", pa.string()),
                    ("correct", pa.string()), ("kind", pa.string()), ("arm", pa.string()), ("draw", pa.int16()),
                    ("order", pa.int32()), ("n_features", pa.int16()), ("value", pa.float64()),
                    ("features", pa.list_(pa.int32())), ("attributions", floats), ("mean_activations", floats),
                    ("clamp_values", floats), ("metric", pa.float64()), ("answer_before", pa.string()),
                    ("answer_after", pa.string()), ("text_before", pa.string()), ("text_after", pa.string()),
                    ("flipped", pa.bool_()), ("changed", pa.bool_()), ("ppl_before", pa.float64()),
                    ("ppl_after", pa.float64()), ("fluent", pa.bool_()), ("success", pa.bool_())])
write_parquet(sm.output[0], pa.Table.from_pylist(rows, schema=schema))
