"""Subject models: the demo composite keeps SmolLM2's weights; hooks; image-token coordinates."""

import pytest
import torch
from PIL import Image

from mmsae.models import ActivationCapture, image_token_coordinates, load_subject_model, resolve_hook_point


def test_demo_composite_equals_smollm2_on_text(demo_model_dir):
    from mmsae.models.demo import load_smollm2

    subject = load_subject_model(demo_model_dir)
    assert type(subject.model).__name__ == "LlavaNextForConditionalGeneration"
    lm, tok = load_smollm2()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        a = lm(ids).logits
        b = subject.model(input_ids=ids).logits
    assert b.shape[-1] == a.shape[-1] + 1  # one more row: <image>
    torch.testing.assert_close(b[..., : a.shape[-1]], a, rtol=0, atol=1e-5)
    g1 = lm.generate(ids, max_new_tokens=10, do_sample=False)
    g2 = subject.model.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(g1, g2)
    assert "Paris" in tok.decode(g2[0, ids.shape[1]:])


def test_hook_point_errors_name_the_path(tiny_llava_dir):
    subject = load_subject_model(tiny_llava_dir)
    with pytest.raises(ValueError, match="model.language_model.layers.99"):
        resolve_hook_point(subject.model, "model.language_model.layers.99")


def test_capture_stops_at_the_hooked_layer(tiny_llava_dir):
    subject = load_subject_model(tiny_llava_dir)
    ids = subject.tokenizer("hello world", return_tensors="pt")["input_ids"]
    later = resolve_hook_point(subject.model, "model.language_model.layers.3")
    ran = []
    h = later.register_forward_hook(lambda *a: ran.append(1))
    with ActivationCapture(resolve_hook_point(subject.model, "model.language_model.layers.1"), stop=True) as cap:
        stopped = cap.run(subject.model, input_ids=ids)
    assert not ran
    with ActivationCapture(resolve_hook_point(subject.model, "model.language_model.layers.1"), stop=False) as cap:
        full = cap.run(subject.model, input_ids=ids, output_hidden_states=False)
    h.remove()
    assert ran and torch.equal(stopped, full) and stopped.shape == (1, ids.shape[1], 64)


@pytest.mark.parametrize("size", [(56, 56), (40, 120), (130, 50), (300, 97), (17, 260)])
def test_image_token_coordinates_match_processor(tiny_llava_dir, size):
    subject = load_subject_model(tiny_llava_dir)
    w, h = size
    image = Image.new("RGB", (w, h), (10, 200, 30))
    text = subject.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True)
    inputs = subject.processor(images=image, text=text, return_tensors="pt")
    assert inputs["image_sizes"].tolist() == [[h, w]]
    n_tokens = int((inputs["input_ids"] == subject.image_token_id).sum())
    coords = image_token_coordinates(subject.model, inputs["image_sizes"])[0]
    assert len(coords) == n_tokens
    side = 56 // 14
    base = coords[coords[:, 0] == 0]
    assert len(base) == side * side  # the base view comes first, complete, in row-major order
    assert torch.equal(coords[: side * side], base)
    assert sorted(map(tuple, base[:, 1:].tolist())) == [(r, c) for r in range(side) for c in range(side)]
    tiles = coords[coords[:, 0] >= 1]  # may be empty: a 17x260 image unpads to zero tile columns
    if len(tiles):
        assert tiles[:, 1:].min() >= 0 and tiles[:, 1:].max() < side
    newlines = coords[coords[:, 0] == -2]
    assert len(newlines) > 0 and (newlines[:, 1:] == -1).all()
    # each newline closes a row of the unpadded tile grid: equal-length runs between newlines
    is_nl = (coords[side * side:, 0] == -2).tolist()
    runs, n = [], 0
    for flag in is_nl:
        if flag:
            runs.append(n)
            n = 0
        else:
            n += 1
    assert n == 0 and len(set(runs)) == 1
