"""Cross-modal features (mmsae.codes.crossmodal) on planted codes, against rates counted by hand."""

import numpy as np
import polars as pl
import pytest

from mmsae.codes.crossmodal import CrossmodalConfig, best_pair, crossmodal_scores, cyclic_derangement
from mmsae.codes.schema import CODE_SCHEMA

N = 20


def _codes(rows):
    return pl.DataFrame(rows, schema=pl.Schema(CODE_SCHEMA)).lazy()


def _row(s, tok, mod, f, a=1.0):
    return {"sample_id": f"s{s:02d}", "token_index": tok, "modality": mod, "view": 0 if mod == "image" else -1,
            "patch_row": 0, "patch_col": tok if mod == "image" else -1, "feature": f, "activation": a}


def planted():
    rows = []
    for s in range(N):
        rows += [_row(s, 0, "image", 99), _row(s, 30, "text", 99)]  # a template feature on every pair
        if s < 10:
            rows += [_row(s, 1, "image", 1, 2.0 + s), _row(s, 31, "text", 1, 1.0 + s)]  # image and its caption word
            rows += [_row(s, 32, "text", 3)]  # text only, on these pairs
        else:
            rows += [_row(s, 2, "image", 3)]  # ... and image only on the others
        rows += [_row(s, 3, "image", 2)]  # image alone, everywhere
    rows += [_row(N, 33, "text", 1)]  # a text-only sample: not a pair
    return _codes(rows)


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 57):
        p = cyclic_derangement(n, 4)
        assert sorted(p) == list(range(n)) and not (p == np.arange(n)).any()
    assert (cyclic_derangement(30, 1) == cyclic_derangement(30, 1)).all()
    with pytest.raises(ValueError, match="at least 2"):
        cyclic_derangement(1, 0)


def test_planted_features_get_the_hand_counted_rates():
    cfg = CrossmodalConfig(n_boot=300, seed=7)
    out = {r["feature"]: r for r in crossmodal_scores(planted(), cfg).iter_rows(named=True)}
    assert set(out) == {1, 3, 99}  # feature 2 never fires on text: no row
    perm = cyclic_derangement(N, 7)  # pairs are s00..s19 in order; the text of pair perm[i] meets image i
    image1, text1 = [i < 10 for i in range(N)], [i < 10 for i in range(N)]
    shuffled = sum(image1[i] and text1[perm[i]] for i in range(N)) / N
    f1 = out[1]
    assert f1["n_pairs"] == N and f1["n_matched"] == 10 and f1["matched_rate"] == 0.5
    assert f1["shuffled_rate"] == pytest.approx(shuffled) and f1["excess"] == pytest.approx(0.5 - shuffled)
    assert f1["excess_ci_low"] > 0 and f1["excess_ci_low"] <= f1["excess"] <= f1["excess_ci_high"]
    f3 = out[3]  # either modality alone: never both in one pair
    assert f3["n_matched"] == 0 and f3["matched_rate"] == 0.0 and f3["excess_ci_low"] is None
    assert f3["shuffled_rate"] == pytest.approx(sum((i >= 10) and (perm[i] < 10) for i in range(N)) / N)
    f99 = out[99]  # fires on every pair's image and text: matched is chance
    assert f99["matched_rate"] == f99["shuffled_rate"] == 1.0 and f99["ratio"] == 1.0 and f99["excess"] == 0.0
    assert list(crossmodal_scores(planted(), cfg)["feature"])[0] == 1  # sorted by excess


def test_best_pair_is_strongest_on_both_sides():
    ids = [f"s{s:02d}" for s in range(N)]
    assert best_pair(planted(), 1, ids) == ("s09", 11.0, 10.0)
    assert best_pair(planted(), 2, ids) is None


def test_report_section_shows_matched_beside_shuffled_and_the_pair(tmp_path):
    import sys

    from PIL import Image

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from report_inputs import inputs

    from mmsae.codes.crossmodal import pair_examples
    from mmsae.report.page import ReportInputs, build_report

    rng = np.random.default_rng(0)
    for s in range(N):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"s{s:02d}.png")
    samples = pl.DataFrame({"sample_id": [f"s{s:02d}" for s in range(N + 1)],
                            "image_path": [str(tmp_path / f"s{s:02d}.png") for s in range(N)] + [None],
                            "tokens": [[f"w{t}" for t in range(40)]] * (N + 1)})
    table = crossmodal_scores(planted(), CrossmodalConfig(n_boot=50))
    ex = pair_examples(planted(), samples, table, n=2, side=4)
    assert ex["feature"].to_list() == [1, 99] and ex["sample_id"][0] == "s09"
    assert ex["tokens"][0][ex["focus"][0]] == "w31"  # the caption word the feature fires on
    page = build_report(ReportInputs(**inputs(tmp_path / "r"), crossmodal=table, crossmodal_examples=ex))
    assert "Cross-modal features" in page and "data:image/png;base64," in page
    f1 = table.row(0, named=True)
    assert f"{f1['shuffled_rate']:.3f}" in page and f"{f1['matched_rate']:.3f}" in page
    assert "Cross-modal features" not in build_report(ReportInputs(**inputs(tmp_path / "r")))
