"""Corpora and tolerant image loading."""

import pytest

from mmsae.data import build_corpus, load_image, skimage_photo_paths


def test_skimage_photos_ship_in_the_wheel():
    paths = skimage_photo_paths()
    assert len(paths) >= 9 and all(p.is_file() for p in paths.values())
    img, status = load_image(paths["chelsea"])
    assert img.mode == "RGB" and status == "ok"


@pytest.mark.parametrize("name,expect", [
    ("good.png", "ok"), ("cmyk.jpg", "converted from CMYK"), ("deep16.png", "converted from I"),
    ("palette.png", "converted from P"), ("alpha.png", "converted from RGBA"),
    ("truncated.jpg", "truncated"), ("junk.png", "unreadable"), ("tiny.png", "degenerate size"),
    ("blank.png", "degenerate: a single colour"), ("missing.png", "missing file"),
])
def test_odd_images(image_dir, name, expect):
    img, status = load_image(image_dir / name)
    assert status.startswith(expect)
    assert (img is None) == (expect in ("truncated", "unreadable", "degenerate size", "degenerate: a single colour", "missing file"))
    if img is not None:
        assert img.mode == "RGB"


def test_corpus_sources(image_dir, tmp_path):
    s = build_corpus({"source": "skimage", "names": ["chelsea", "rocket"], "prompts": ["a", "b"], "text_prompts": ["t"]})
    assert [x.sample_id for x in s] == ["img-chelsea-p0", "img-chelsea-p1", "img-rocket-p0", "img-rocket-p1", "txt-0000"]
    (tmp_path / "t.csv").write_text(f"image,prompt\n{image_dir / 'good.png'},what\n,text only\n")
    s = build_corpus({"source": "table", "path": str(tmp_path / "t.csv")})
    assert [(x.image_path is not None, x.prompt) for x in s] == [(True, "what"), (False, "text only")]
    with pytest.raises(ValueError, match="corpus.names"):
        build_corpus({"source": "skimage", "names": ["nope"], "prompts": ["a"]})
    with pytest.raises(FileNotFoundError, match="corpus.path"):
        build_corpus({"source": "folder", "path": str(tmp_path / "none"), "prompts": ["a"]})
    with pytest.raises(ValueError, match="missing column 'prompt'"):
        (tmp_path / "bad.csv").write_text("image\nx.png\n")
        build_corpus({"source": "table", "path": str(tmp_path / "bad.csv")})
