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


def test_name_collisions_are_distinct_samples_and_stems_resolve(tmp_path):
    from PIL import Image

    from mmsae.data import resolve_image_ref

    for name in ("cat.png", "cat.jpg", "my cup.png", "my_cup.png", "sub/dog.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), (len(name), 0, 0)).save(tmp_path / name)
    (tmp_path / "readme.txt").write_text("not an image")
    corpus = {"source": "folder", "path": str(tmp_path), "prompts": ["a"]}
    s = build_corpus(corpus)
    assert sorted(x.sample_id for x in s) == ["img-cat.jpg-p0", "img-cat.png-p0", "img-my cup.png-p0", "img-my_cup.png-p0",
                                              "img-sub/dog.png-p0"]
    assert len({x.image_path for x in s}) == 5
    assert resolve_image_ref("chelsea", corpus=corpus).endswith("chelsea.png")  # scikit-image names still work
    assert resolve_image_ref("dog", corpus=corpus) == str(tmp_path / "sub/dog.png")  # an unambiguous stem
    assert resolve_image_ref("cat.jpg", corpus=corpus) == str(tmp_path / "cat.jpg")
    with pytest.raises(ValueError, match=r"ambiguous.*cat\.jpg.*cat\.png"):
        resolve_image_ref("cat", corpus=corpus)
    with pytest.raises(FileNotFoundError, match="'nope'"):
        resolve_image_ref("nope", corpus=corpus)


def test_decompression_bomb_and_animation(tmp_path):
    from PIL import Image

    from tests.dirty import header_bomb_png

    (tmp_path / "bomb.png").write_bytes(header_bomb_png(30000, 30000))
    img, status = load_image(tmp_path / "bomb.png")
    assert img is None and status.startswith("decompression bomb")
    Image.new("RGB", (100, 100), (1, 2, 3)).save(tmp_path / "big.png")
    img, status = load_image(tmp_path / "big.png", max_pixels=5000)
    assert img is None and "max_image_pixels=5000" in status
    frames = [Image.new("RGB", (32, 32), (i * 80, 20, 200 - i * 50)) for i in range(3)]
    for f in frames:
        f.putpixel((0, 0), (255, 255, 255))
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    img, status = load_image(tmp_path / "anim.gif")
    assert img is not None and status.startswith("converted") and status.endswith("first of 3 frames")


def test_table_corpus_with_responses_and_llava_conversations(image_dir, tmp_path):
    import json

    (tmp_path / "t.csv").write_text(f"image,prompt,response\n{image_dir / 'good.png'},what,A cat.\n,hi,\n")
    s = build_corpus({"source": "table", "path": str(tmp_path / "t.csv")})
    assert s[0].turns == (("assistant", "A cat."),) and s[1].turns == ()
    conv = [{"id": "1", "image": str(image_dir / "good.png"), "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}]
    (tmp_path / "c.json").write_text(json.dumps(conv))
    s = build_corpus({"source": "table", "path": str(tmp_path / "c.json")})
    assert s[0].prompt == "What is it?" and s[0].image_path == str(image_dir / "good.png")
    assert s[0].turns == (("assistant", "Noise."), ("user", "Sure?"), ("assistant", "Yes."))
    assert s[1].image_path is None and s[1].turns == (("assistant", "4"),)
    (tmp_path / "bad.json").write_text(json.dumps([{"conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(ValueError, match=r"record 0: conversations\[0\].from='robot'"):
        build_corpus({"source": "table", "path": str(tmp_path / "bad.json")})


def test_corpus_listing_agrees_with_extraction_and_ignores_prompts(image_dir):
    """find_neurons' shared listing: every image listed with a status; the skipped ones (those
    extraction skips, by the same loader) never reach usable_samples; prompts do not change it."""
    import pyarrow.parquet as pq

    from mmsae.data import list_images, load_image, usable_samples
    from mmsae.core.io import write_parquet

    corpus = {"source": "folder", "path": str(image_dir), "prompts": ["a"], "text_prompts": ["t"], "max_images": None}
    table = list_images(corpus, None)
    rows = {r["image_key"]: r for r in table.to_pylist()}
    assert set(rows) == {p.name for p in image_dir.iterdir()}  # every file is listed
    for key, r in rows.items():
        image, status = load_image(image_dir / key)
        assert (r["status"] == "skipped") == (image is None)
        assert (r["status"] == "converted") == (image is not None and status != "ok")
        assert r["status"] == "used" or r["reason"]  # a reason for every non-plain image
    assert list_images({**corpus, "prompts": ["other"], "text_prompts": []}, None).equals(table)
    path = image_dir.parent / "listing.parquet"
    write_parquet(path, table)
    usable = usable_samples(path, ["p"], [], None)
    assert {s.image_key for s in usable} == {k for k, r in rows.items() if r["status"] != "skipped"}
    assert pq.read_table(path).num_rows == len(rows)
