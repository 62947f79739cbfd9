"""One owner for the hook-point check: encode and the interventions read ``hook_name`` the same way."""

import pytest

from mmsae.codes.encode import check_sae
from mmsae.sae.io import check_hook_point
from mmsae.sae.model import TopKSAE


def test_encode_refuses_an_sae_whose_metadata_names_another_hook_point():
    # SAELens 6 writes hook_name under metadata only; encode used to read the top level alone and let it pass
    sae = TopKSAE(8, 16, 2)
    cfg = {"metadata": {"hook_name": "model.language_model.layers.3"}}
    with pytest.raises(ValueError, match="layers.3"):
        check_sae(sae, cfg, "model.language_model.layers.5", d_model=8)
    check_sae(sae, cfg, "model.language_model.layers.3", d_model=8)  # the same hook point passes
    with pytest.raises(ValueError, match="d_in=8"):
        check_sae(sae, cfg, "model.language_model.layers.3", d_model=16)


def test_check_hook_point_reads_top_level_and_metadata():
    assert check_hook_point({"hook_name": "a.b"}, "a.b", "x") == "a.b"
    assert check_hook_point({"metadata": {"hook_name": "a.b"}}, "a.b", "x") == "a.b"
    assert check_hook_point({}, "a.b", "x") == "a.b"
    with pytest.raises(ValueError, match="cfg.json"):
        check_hook_point({"metadata": {"hook_name": "a.c"}}, "a.b", "sae/cfg.json")
