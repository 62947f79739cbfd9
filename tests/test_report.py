"""The HTML report from hand-made inputs: every section renders, text is escaped by the templates,
newer outputs (token norms, held-out split, steering verdicts, causal sweep, attribution validation)
show when present and older outputs without them still render."""

import re
import tomllib
from fnmatch import fnmatch

from helpers import REPO
from report_inputs import EVIL, inputs

from mmsae.report.page import ReportInputs, build_report


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_every_section_renders_and_text_is_escaped(tmp_path):
    page = build_report(ReportInputs(**inputs(tmp_path)))
    assert EVIL not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    for anchor in ("id=evaluation", "id=steering", "id=attribution", "id=neurons", 'id="f7"', 'id="f9"'):
        assert anchor in page
    assert page.count("data:image/jpeg;base64,") == 4 + 1 + 2  # 2 maps x (highlight, heatmap), 1 attribution, 2 neuron maps
    assert "Tell me &amp; more" in page and "Cats &lt;3 cats." in page and "request failed: HTTP 503" in page
    assert "[2 image tokens]" in page


def test_new_sae_outputs(tmp_path):
    text = _text(build_report(ReportInputs(**inputs(tmp_path))))
    assert "image 20 45 310" in text and "text 8 30 60" in text  # token norms: median, p99, max
    assert "held-out samples 3 (split by image" in text
    assert "tokens excluded from training and FVU 17" in text and "including excluded tokens 0.45" in text


def test_steering_verdicts_and_perplexity(tmp_path):
    page = build_report(ReportInputs(**inputs(tmp_path)))
    steer = page[page.index("id=steering"):page.index("id=attribution")]
    rows = steer.split("<tr>")[3:]  # header row, unclamped row, then one row per clamp value
    assert ["✓" in r for r in rows] == [False, True, False, False]  # only where success is true
    assert "(unchanged)" in rows[0]
    assert "(changed but not fluent)" in rows[2] and "ppl ×9.00" in rows[2]
    assert "(changed, not toward feature)" in rows[3] and "ppl ×1.20" in rows[3]
    tally = _text(steer)
    assert "Of 4 steered generations, 1 succeeded (2 moved toward the feature)." in tally
    assert ("every other selected feature instead (up to 4 per text), over the 3 generations whose feature has words "
            "(1 succeeded, 2 toward): 0.75 successes and 1.75 toward expected by chance.") in tally


def test_causal_sweep_and_attribution_validation(tmp_path):
    page = build_report(ReportInputs(**inputs(tmp_path)))
    neurons = _text(page[page.index("id=neurons"):])
    assert "scale noun_prob_drop_top noun_prob_drop_random fluency_change_top fluency_change_random" in neurons
    assert "2 0.2 0.02 1 0.8" in neurons and page.count("class=chosen") == 1
    assert "noun removed by noise" not in neurons  # the old causal keys are gone: their rows too
    attr = _text(page[page.index("id=attribution"):page.index("id=neurons")])
    assert "attribution pearson_r sign_agreement n_features ours 0.91 0.875 8 reference 0.88 0.75 8" in attr
    assert "5 special-token positions left undecomposed (the SAE was trained without them" in attr
    steering = _text(page[page.index("id=steering"):page.index("id=attribution")])
    assert "positions: all but special tokens, which the SAE was trained without;" in steering


def test_older_outputs_without_the_new_keys_still_render(tmp_path):
    page = build_report(ReportInputs(**inputs(tmp_path, new=False)))
    text = _text(page)
    assert "Token norms" not in page and "held-out samples" not in text and "class=chosen" not in page
    assert "Pearson r = 0.90 over 2 features" in text and "noun removed by noise on the top-k neurons 0.4" in text
    assert "✓" not in page and "(changed," not in page and "ppl ×" not in page and "left undecomposed" not in page
    assert "but special tokens" not in page and "Control:" not in page
    minimal = {**inputs(tmp_path / "m", new=False), "explanations": None, "steering": None, "attribution": None,
               "neurons": None, "evaluation": None, "metrics": {}}
    page = build_report(ReportInputs(**minimal))
    assert "id=steering" not in page and "Sparse autoencoder" in page


def test_templates_ship_as_package_data():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mmsae.report"]
    files = [p.relative_to(REPO / "mmsae/report").as_posix() for p in (REPO / "mmsae/report/templates").iterdir()]
    assert files and all(any(fnmatch(f, g) for g in data) for f in files), (files, data)


def test_report_shows_the_effective_config_verbatim(tmp_path):
    text = "# effective config of this run: config/llava-next-8b.yaml + --config sae\nsae:\n  k: 64\n"
    page = build_report(ReportInputs(**inputs(tmp_path), effective_config=text))
    assert "config/llava-next-8b.yaml + --config sae" in page and "k: 64" in page
    assert "every key, as the workflow used it" in page
    assert "every key, as the workflow used it" not in build_report(ReportInputs(**inputs(tmp_path)))
