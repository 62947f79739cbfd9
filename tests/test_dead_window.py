"""Dead latents per modality (#28.5): a modality's counter only advances on its own tokens, so its
dead fraction is 0 by construction until it has seen ``dead_tokens`` tokens. Until then it is null,
with the reason, and the tokens seen per modality are logged; after, it equals an independent count.

The SAE trains at lr 0 (the weights stay the initial ones, b_dec included), so the firing of every
step can be recomputed afterwards from the returned SAE and the same batches.
"""

import pytest
import torch
from helpers import FixedBatches

from mmsae.report.page import ENV
from mmsae.report.sections import sae_view
from mmsae.sae.run import NormPass, TrainedOn, finish_training
from mmsae.sae.trainer import TrainConfig, train

D, N, N_IMAGE, STEPS = 16, 32, 4, 20  # 4 image tokens per 32-token batch: 80 image, 560 text tokens in all


def _stream():
    """A fixed list of batches: the first N_IMAGE rows of each are image tokens."""
    gen = torch.Generator().manual_seed(0)
    return FixedBatches([torch.randn(N, D, generator=gen) for _ in range(STEPS)], torch.arange(N) < N_IMAGE, "fake")


def _independent_dead_fraction(sae, stream, mask_of, window):
    """Per latent: the modality's tokens in the batches after the last batch where it fired on one of
    them (all of them when it never fired); dead when that reaches ``window``."""
    since = torch.zeros(sae.d_sae, dtype=torch.long)
    with torch.no_grad():
        for x, is_image in stream.train_batches():
            m = mask_of(is_image)
            out = sae(x)
            fired = torch.zeros(sae.d_sae, dtype=torch.bool)
            idx, vals = out.top_idx[m], out.top_vals[m]
            fired[idx[vals > 0]] = True
            since += int(m.sum())
            since[fired] = 0
    return (since >= window).float().mean().item()


def _train(tmp_path, dead_tokens):
    cfg = TrainConfig(d_sae=64, k=2, steps=STEPS, batch_size=N, lr=0.0, warmup_steps=1, checkpoint_every=100,
                      dead_tokens=dead_tokens, b_dec_init_tokens=64, aux_coef=0.0)
    stream = _stream()
    sae, rows, fires = train(stream, D, cfg, tmp_path / "ckpt", progress=False)
    return cfg, stream, sae, rows, fires


def test_modality_below_the_window_is_null_with_tokens_seen(tmp_path):
    cfg, stream, sae, rows, fires = _train(tmp_path, dead_tokens=100)  # 80 image tokens < 100 <= 560 text tokens
    assert [r["tokens_seen_image"] for r in rows] == [N_IMAGE * (s + 1) for s in range(STEPS)]
    assert [r["tokens_seen_text"] for r in rows] == [(N - N_IMAGE) * (s + 1) for s in range(STEPS)]
    assert all(r["dead_fraction_image"] is None for r in rows)
    text = _independent_dead_fraction(sae, stream, lambda m: ~m, 100)
    assert text > 0 and rows[-1]["dead_fraction_text"] == pytest.approx(text)
    assert rows[0]["dead_fraction_text"] is None  # 28 text tokens after the first step

    heldout = (torch.randn(40, D), torch.arange(40) < 10)
    metrics = finish_training(sae, rows, fires, cfg, {}, TrainedOn(D, "m", "h", []), NormPass({}), heldout, tmp_path / "out")
    assert metrics["dead_fraction_image"] is None and "80" in metrics["dead_fraction_image_null_reason"]
    assert metrics["dead_tokens_seen"] == {"all": N * STEPS, "image": 80, "text": 560, "window": 100}
    assert metrics["dead_fraction_text"] == pytest.approx(text)

    view = sae_view(metrics, None)
    html = ENV.get_template("sae.html.j2").render(sae=view, curve=None)
    row = next(line for line in html.splitlines() if "dead_fraction_image" in line)
    assert "–" in row and "80" in row  # shown as missing, with the reason


def test_modality_past_the_window_matches_an_independent_count(tmp_path):
    cfg, stream, sae, rows, _ = _train(tmp_path, dead_tokens=40)  # 80 image tokens > 40
    image = _independent_dead_fraction(sae, stream, lambda m: m, 40)
    assert rows[-1]["dead_fraction_image"] == pytest.approx(image) and image > 0
    assert rows[8]["dead_fraction_image"] is None and rows[9]["dead_fraction_image"] is not None  # 36, then 40 seen
    assert rows[-1]["dead_fraction_text"] == pytest.approx(_independent_dead_fraction(sae, stream, lambda m: ~m, 40))
