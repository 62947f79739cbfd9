"""The rehearsal's data, offline: LLaVA-NeXT-Data in its published Parquet schema and an image folder.

``data/llava-next-data/data/train-0000{0,1}-of-00002.parquet`` has the columns of the Hub dataset
``lmms-lab/LLaVA-NeXT-Data`` as ``datasets`` writes them: ``id`` (string), ``conversations`` (list of
``{from, value}``, ``human``/``gpt`` turns, the first human turn opening with ``<image>\\n`` when there
is an image), ``data_source`` (string) and ``image`` (struct ``{bytes, path}``, null for the text-only
rows). The images are the photographs and textures inside scikit-image's wheel, stored as their
files' bytes; some conversations have two rounds. ``data/interpret-images/`` holds image files for
``corpus.interpret`` (a folder, as the paper config says). The descriptions are ours, written for
these photos.
"""

from __future__ import annotations

import os
from pathlib import Path

TRAIN_DIR = "data/llava-next-data/data"  # relative to the working directory (config/rehearsal.yaml)
INTERPRET_DIR = "data/interpret-images"

# scikit-image data file -> (question, answer[, question, answer])
IMAGE_CONVERSATIONS = {
    "astronaut.png": ("What is the person in this photo wearing?",
                      "She is wearing an orange flight suit with patches, standing in front of a flag.",
                      "Where might this photo have been taken?", "Probably at a space agency, for an official portrait."),
    "chelsea.png": ("What animal is this?", "A ginger tabby cat with green eyes, looking to the side."),
    "coffee.png": ("Describe the drink.", "A cup of coffee with a leaf drawn in the milk foam, on a saucer."),
    "rocket.jpg": ("What is shown here?", "A rocket standing on its launch pad, with a tower beside it."),
    "motorcycle_left.png": ("What vehicle is in the picture?", "A motorcycle parked indoors next to some shelves."),
    "hubble_deep_field.jpg": ("What do you see?", "Many small galaxies scattered over a black sky."),
    "ihc.png": ("What kind of image is this?", "A microscope image of stained tissue, with brown and blue cells.",
                "Which colours dominate?", "Brown and pale blue."),
    "retina.jpg": ("What is this?", "A photograph of the back of an eye, with red blood vessels."),
    "brick.png": ("Describe the texture.", "A wall of grey bricks laid in regular rows."),
    "grass.png": ("What is this a picture of?", "A close view of many thin blades of grass."),
    "gravel.png": ("Describe the surface.", "Small stones of gravel packed together."),
    "coins.png": ("How many objects are there?", "About two dozen old coins on a dark background."),
    "camera.png": ("What is the man doing?", "He is looking through a camera mounted on a tripod."),
    "page.png": ("What is on this page?", "Lines of printed text on a sheet of paper."),
    "moon.png": ("What is this?", "The surface of the moon, covered with craters."),
    "horse.png": ("What shape is this?", "The dark silhouette of a horse standing."),
}
TEXT_CONVERSATIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a short sentence about the sea.", "The sea was calm and grey under the morning clouds."),
    ("What is 12 times 7?", "12 times 7 is 84.", "And 12 times 8?", "96."),
    ("Is a tomato a fruit? Answer Yes or No.", "Yes"),
]
INTERPRET_FILES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "brick.png", "grass.png", "coins.png",
                   "camera.png"]
# words of config/rehearsal.yaml's attribution and neuron cases, which must be single tokens
CASE_WORDS = ["Yes", "No", "Paris", "London", "cat", "dog"]


def vocabulary_text() -> str:
    """Every text of the rehearsal's data, then each case word 50 times alone and after a space (the
    subject tokenizer is trained on it, so the case words become single tokens)."""
    texts = [t for conv in IMAGE_CONVERSATIONS.values() for t in conv]
    texts += [t for conv in TEXT_CONVERSATIONS for t in conv]
    return "\n".join(texts + [f"{w}\n {w}" for w in CASE_WORDS] * 50)


def recipe() -> dict:
    return {"kind": "llava-next-data-rehearsal", "version": 1, "images": IMAGE_CONVERSATIONS,
            "texts": TEXT_CONVERSATIONS, "interpret": INTERPRET_FILES}


def _skimage_file(name: str) -> Path:
    import skimage

    path = Path(skimage.__file__).parent / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not inside the installed scikit-image ({path})")
    return path


def _turns(conv: tuple, image: bool) -> list[dict]:
    out = []
    for i, value in enumerate(conv):
        human = i % 2 == 0
        out.append({"from": "human" if human else "gpt", "value": ("<image>\n" if image and i == 0 else "") + value})
    return out


def rows() -> list[dict]:
    """The table's rows, in order: the image conversations interleaved with the text-only ones."""
    image_rows = [{"id": f"rehearsal-{Path(name).stem}", "conversations": _turns(conv, True),
                   "data_source": "rehearsal/scikit-image",
                   "image": {"bytes": _skimage_file(name).read_bytes(), "path": name}}
                  for name, conv in IMAGE_CONVERSATIONS.items()]
    text_rows = [{"id": f"rehearsal-text-{i}", "conversations": _turns(conv, False), "data_source": "rehearsal/text",
                  "image": None} for i, conv in enumerate(TEXT_CONVERSATIONS)]
    out = []
    for i, row in enumerate(image_rows):
        out.append(row)
        if i % 4 == 3 and text_rows:
            out.append(text_rows.pop(0))
    return out + text_rows


def schema():
    """lmms-lab/LLaVA-NeXT-Data's Arrow schema (the ``datasets`` Image feature is struct bytes/path)."""
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("data_source", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ])


def build(workdir: str | os.PathLike) -> dict[str, Path]:
    """Write the training table (two files, row groups of 4 rows) and the interpretation folder under
    ``workdir`` (each kept when already built).

    Returns:
        ``{"train": folder of the Parquet files, "interpret": image folder}``.
    """
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmsae.rehearsal import building, is_built

    workdir = Path(workdir)
    train, interpret = workdir / TRAIN_DIR, workdir / INTERPRET_DIR
    if not is_built(train, recipe()):
        table = pa.Table.from_pylist(rows(), schema=schema())
        half = (table.num_rows + 1) // 2
        with building(train, recipe()) as tmp:
            for k, part in enumerate([table.slice(0, half), table.slice(half)]):
                pq.write_table(part, tmp / f"train-{k:05d}-of-00002.parquet", row_group_size=4)
    if not is_built(interpret, recipe()):
        with building(interpret, recipe()) as tmp:
            for name in INTERPRET_FILES:
                shutil.copyfile(_skimage_file(name), tmp / name)
    return {"train": train, "interpret": interpret}
