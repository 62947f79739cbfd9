"""A Neuronpedia import folder for one source (one SAE at one hook point).

The layout and field names follow hijohnnylin/neuronpedia
``utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py`` (which
turns SAEDashboard's ``batch-*.json`` into an export) and its ``db_models/*.py`` dataclasses::

    <out>/<model_id>/<source_id>/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl      one record each
        features/batch-<n>.jsonl.gz       one Feature record per line (logits, histograms, density)
        activations/batch-<n>.jsonl.gz    one Activation record per top example (tokens + values)
        explanations/batch-<n>.jsonl.gz   one Explanation record per explained feature
    <out>/README.md, <out>/images/<feature>/<rank>-highlight.png

``source_id`` is ``<layer>-<source set>`` as the script builds it. Explanations are not written by the
conversion script; their folder and fields follow ``export-data.py`` (``<source>/explanations``) and
``db_models/explanation.py``, with the detection and fuzzing scores in ``scoreV1``/``scoreV2`` (columns of
Neuronpedia's ``Explanation`` table in ``apps/webapp/prisma/schema.prisma``).

Neuronpedia has no field for image tokens: an image example's tokens are the labels ``<img vV rR cC>``
(view, patch row, patch column) in token order, and its highlighted PNG is copied beside the export.
The schema the records are checked against is ``neuronpedia_schema.json`` next to this module.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import polars as pl

from mmsae.evaluate.accuracy import balanced_from_counts, confusion

SCHEMA_FILE = Path(__file__).with_name("neuronpedia_schema.json")
FEATURES_PER_BATCH = 128  # SAEDashboard's usual n_features_per_batch: one batch file per 128 features
CREATOR_ID = "<creator-id>"  # Neuronpedia's user id of the uploader: filled in by whoever imports


@dataclass
class SourceInfo:
    """What names the source on Neuronpedia (the conversion script's command-line options)."""

    model_id: str
    source_set: str
    layer: int | str
    hook_point: str
    release: str
    description: str = ""
    creator_name: str = "mmsae"
    hf_repo_id: str | None = None
    hf_folder_id: str | None = None
    dataset: str | None = None
    num_prompts: int | None = None
    num_tokens_in_prompt: int | None = None
    urls: list[str] = field(default_factory=list)

    @property
    def source_id(self) -> str:
        return f"{self.layer}-{self.source_set}"


def image_token_label(view: int, row: int | None, col: int | None) -> str:
    """The token string that stands for image patch (view, row, col): ``<img v0 r3 c5>``; an image
    token without a patch (the image-newline tokens, view -2, have no column) is ``<img v-2 r3>`` or
    ``<img v-2>``."""
    parts = [f"v{int(view)}"] + [f"{k}{int(x)}" for k, x in (("r", row), ("c", col)) if x is not None]
    return "<img " + " ".join(parts) + ">"


def _id(*parts) -> str:
    """A stable 25-character id (Neuronpedia uses cuid2 ids of that length)."""
    return "c" + hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:24]


def activation_record(src: SourceInfo, feature: int, rank: int, kind: str, tokens: list[str], values: list[float],
                      focus: int | None, created: str) -> dict:
    """One top example as Neuronpedia's ``Activation`` (``db_models/activation.py``).

    Raises:
        ValueError: tokens and values differ in length, or are empty.
    """
    if len(tokens) != len(values) or not tokens:
        raise ValueError(f"feature {feature} example {rank}: {len(tokens)} tokens but {len(values)} values")
    values = [float(v) for v in values]
    mx = max(values)
    return {
        "id": _id(src.model_id, src.source_id, feature, kind, rank), "tokens": list(tokens), "index": int(feature),
        "layer": src.source_id, "modelId": src.model_id, "maxValue": mx, "maxValueTokenIndex": values.index(mx),
        "minValue": min(values), "values": values, "creatorId": CREATOR_ID, "dataSource": None, "dataIndex": None,
        "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": created, "lossValues": [],
        "logitContributions": None, "binMin": None, "binMax": None, "binContains": None,
        "qualifyingTokenIndex": int(focus) if focus is not None else values.index(mx), "zIndices": None, "zValues": None,
    }


def feature_record(src: SourceInfo, feature: int, *, frac_nonzero: float, max_act: float, logit: dict,
                   freq_hist: tuple[list, list], created: str) -> dict:
    """One feature as Neuronpedia's ``Feature`` (``db_models/feature.py``), every field the conversion
    script writes. ``logit``: pos_str, pos_values, neg_str, neg_values, hist_values, hist_heights."""
    return {
        "modelId": src.model_id, "layer": src.source_id, "index": int(feature), "creatorId": CREATOR_ID,
        "createdAt": created, "maxActApprox": float(max_act), "hasVector": False, "vector": [], "vectorLabel": None,
        "vectorDefaultSteerStrength": 10, "hookName": None, "topkCosSimIndices": [], "topkCosSimValues": [],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
        "neg_str": list(logit["neg_str"]), "neg_values": [float(v) for v in logit["neg_values"]],
        "pos_str": list(logit["pos_str"]), "pos_values": [float(v) for v in logit["pos_values"]],
        "frac_nonzero": float(frac_nonzero),
        "freq_hist_data_bar_heights": [float(h) for h in freq_hist[1]],
        "freq_hist_data_bar_values": [float(v) for v in freq_hist[0]],
        "logits_hist_data_bar_heights": [float(h) for h in logit.get("hist_heights", [])],
        "logits_hist_data_bar_values": [float(v) for v in logit.get("hist_values", [])],
        "decoder_weights_dist": [], "sourceSetName": src.source_set,
    }


def explanation_record(src: SourceInfo, feature: int, text: str, explainer: str | None,
                       detection: float | None, fuzzing: float | None, created: str) -> dict:
    """One explanation as Neuronpedia's ``Explanation`` (``db_models/explanation.py``) plus ``scoreV1``
    (detection balanced accuracy) and ``scoreV2`` (fuzzing balanced accuracy); None where unscored."""
    return {
        "id": _id(src.model_id, src.source_id, feature, "explanation"), "modelId": src.model_id,
        "layer": src.source_id, "index": int(feature), "description": text, "authorId": CREATOR_ID,
        "embedding": None, "triggeredById": None, "typeName": None, "explanationModelName": explainer,
        "notes": "scoreV1 = detection, scoreV2 = fuzzing balanced accuracy (held-out examples, mmsae)",
        "createdAt": created, "scoreV1": detection, "scoreV2": fuzzing,
    }


def header_records(src: SourceInfo, created: str) -> dict[str, dict]:
    """release / model / sourceset / source records (``db_models/{source_release,model,source_set,source}.py``),
    with the values the conversion script gives them."""
    return {
        "release": {"name": src.release, "description": src.description or src.release, "creatorName": src.creator_name,
                    "creatorId": CREATOR_ID, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
                    "descriptionShort": src.description or src.release, "urls": list(src.urls), "creatorEmail": None,
                    "creatorNameShort": src.creator_name, "defaultSourceSetName": None, "defaultSourceId": None,
                    "defaultUmapSourceIds": [], "createdAt": created},
        "model": {"id": src.model_id, "instruct": src.model_id.endswith("-it"), "creatorId": CREATOR_ID,
                  "displayNameShort": src.model_id, "displayName": src.model_id, "tlensId": None, "dimension": None,
                  "visibility": "PUBLIC", "defaultSourceSetName": None, "defaultSourceId": None,
                  "inferenceEnabled": True, "layers": 0, "neuronsPerLayer": 0, "createdAt": created, "owner": "",
                  "updatedAt": created, "website": None},
        "sourceset": {"modelId": src.model_id, "name": src.source_set, "creatorId": CREATOR_ID, "hasDashboards": True,
                      "visibility": "PUBLIC", "description": src.description, "type": "", "creatorName": src.creator_name,
                      "urls": [], "creatorEmail": None, "releaseName": src.release, "defaultOfModelId": None,
                      "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                      "showHeadAttribution": False, "showUmap": False, "createdAt": created},
        "source": {"id": src.source_id, "modelId": src.model_id, "setName": src.source_set, "creatorId": CREATOR_ID,
                   "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None,
                   "saelensRelease": None, "saelensSaeId": None, "hfRepoId": src.hf_repo_id,
                   "hfFolderId": src.hf_folder_id, "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False,
                   "hasUmapLogSparsity": False, "hasUmapClusters": False, "num_prompts": src.num_prompts,
                   "num_tokens_in_prompt": src.num_tokens_in_prompt, "dataset": src.dataset, "notes": None,
                   "createdAt": created},
    }


def image_examples(maps: pl.DataFrame, image_codes: pl.DataFrame, feature: int) -> list[tuple[int, list[str], list[float], str]]:
    """A feature's top image examples as (rank, token labels, values, highlight PNG path relative to the maps folder).

    ``image_codes``: code rows (:data:`mmsae.codes.schema.CODE_SCHEMA`) of the image tokens of the samples in
    ``maps``, every feature's: the tokens of a sample are its image tokens that appear there (under TopK every
    token has k active latents, so all of them), in token order; a token's value is this feature's activation
    on it, 0 where the feature is not active.

    Raises:
        ValueError: a map's sample has no image tokens in ``image_codes``.
    """
    out = []
    for row in maps.filter(pl.col("feature") == feature).sort("rank").iter_rows(named=True):
        toks = (image_codes.filter(pl.col("sample_id") == row["sample_id"])
                .group_by("token_index", maintain_order=True)
                .agg(pl.col("view").first(), pl.col("patch_row").first(), pl.col("patch_col").first(),
                     pl.col("activation").filter(pl.col("feature") == feature).max().fill_null(0.0).alias("value"))
                .sort("token_index"))
        if toks.height == 0:
            raise ValueError(f"feature {feature}: map sample {row['sample_id']!r} has no image tokens in the codes")
        labels = [image_token_label(v, r, c) for v, r, c in toks.select("view", "patch_row", "patch_col").iter_rows()]
        out.append((row["rank"], labels, toks["value"].to_list(), row["highlight"]))
    return out


def per_feature_scores(scoring: pl.DataFrame | None) -> dict[int, dict[str, float | None]]:
    """Balanced accuracy of each feature's real explanation per scoring method (``detection``, ``fuzzing``),
    from the confusion counts summed over its requests (:mod:`mmsae.evaluate.accuracy`, as the scoring
    summary pools them). Examples without a prediction count nothing; None when the feature has no
    activating or no non-activating example."""
    out: dict[int, dict[str, float | None]] = {}
    if scoring is None or scoring.height == 0:
        return out
    real = scoring.filter(pl.col("explanation_kind") == "real")
    for (f, method), g in real.group_by(["feature", "method"]):
        counts = [confusion(labels, preds) for labels, preds in g.select("labels", "predictions").iter_rows()
                  if labels is not None]
        out.setdefault(int(f), {})[method] = balanced_from_counts(*map(sum, zip(*counts))) if counts else None
    return out


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(json.dumps(r, allow_nan=False).encode() + b"\n" for r in rows)
    path.write_bytes(gzip.compress(data, compresslevel=5, mtime=0))


def write_export(out: str | Path, src: SourceInfo, features: list[dict], activations: list[dict],
                 explanations: list[dict], images: list[tuple[Path, str]], readme: str) -> Path:
    """Check every record against the schema and write the export folder (see the module docstring).

    Args:
        out: the export folder (created; must not exist yet, so a half-written one is never mistaken for done).
        features, activations, explanations: records from :func:`feature_record` etc.
        images: (source PNG, destination relative to ``out``) pairs to copy.
        readme: text of ``out/README.md``.

    Returns:
        The source folder ``out/<model_id>/<source_id>``.

    Raises:
        jsonschema.ValidationError: a record does not match the schema (names the record kind and index).
        FileExistsError: ``out`` exists.
    """
    out = Path(out)
    created = features[0]["createdAt"] if features else datetime.now(timezone.utc).isoformat()
    headers = header_records(src, created)
    validate_records(headers, features, activations, explanations)
    out.mkdir(parents=True, exist_ok=False)
    base = out / src.model_id / src.source_id
    base.mkdir(parents=True)
    for name, rec in headers.items():
        (base / f"{name}.jsonl").write_text(json.dumps(rec) + "\n")
    order = sorted({r["index"] for r in features})
    batch_of = {f: i // FEATURES_PER_BATCH for i, f in enumerate(order)}
    for kind, rows in (("features", features), ("activations", activations), ("explanations", explanations)):
        by_batch: dict[int, list[dict]] = {}
        for r in rows:
            by_batch.setdefault(batch_of.get(r["index"], 0), []).append(r)
        for b, rs in sorted(by_batch.items()):
            _write_jsonl_gz(base / kind / f"batch-{b}.jsonl.gz", rs)
    for src_png, rel in images:
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_png, dest)
    (out / "README.md").write_text(readme)
    return base


def load_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def validate_records(headers: dict[str, dict], features: list[dict], activations: list[dict],
                     explanations: list[dict]) -> None:
    """Check records against ``neuronpedia_schema.json`` (one definition per record kind).

    Raises:
        jsonschema.ValidationError: with the record kind and index in its message.
    """
    schema = load_schema()
    groups = [(k, [v]) for k, v in headers.items()] + [("feature", features), ("activation", activations),
                                                        ("explanation", explanations)]
    for kind, rows in groups:
        sub = {"$ref": f"#/$defs/{kind}", "$defs": schema["$defs"]}
        for i, r in enumerate(rows):
            try:
                jsonschema.validate(r, sub)
            except jsonschema.ValidationError as e:
                raise jsonschema.ValidationError(f"neuronpedia {kind} record {i}: {e.message}") from e


def read_export(base: str | Path) -> dict[str, list[dict]]:
    """Read a source folder back: ``{"release": [...], ..., "features": [...], "activations": [...], "explanations": [...]}``."""
    base = Path(base)
    out: dict[str, list[dict]] = {}
    for name in ("release", "model", "sourceset", "source"):
        out[name] = [json.loads(line) for line in (base / f"{name}.jsonl").read_text().splitlines() if line]
    for kind in ("features", "activations", "explanations"):
        rows = []
        for p in sorted((base / kind).glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split("-")[1].split(".")[0])):
            rows += [json.loads(line) for line in gzip.decompress(p.read_bytes()).decode().splitlines() if line]
        out[kind] = rows
    return out
