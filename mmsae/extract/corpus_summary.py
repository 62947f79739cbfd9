"""What a pass of the model over a corpus records beside its shards: the model's identity, the token
strings of each sample (every distinct id decoded once) and the images it used or converted.

Shared by extraction (:mod:`mmsae.extract.run`, dense shards of ``corpus.train``) and encoding from the
model (:mod:`mmsae.codes.encode`, sparse codes of ``corpus.interpret``), so both manifests and samples
tables say the same things in the same way.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmsae.models import SubjectModel, layer_index


def model_meta(subject: SubjectModel, hook_point: str) -> dict:
    """``model``, ``revision``, ``hook_point``, ``layer``, ``d_model`` and ``grid_side`` (patches per side
    of one image view; None for a model without a vision tower)."""
    config = subject.model.config
    vcfg = getattr(config, "vision_config", None)
    return {
        "model": subject.name,
        "revision": getattr(config, "_commit_hash", None),
        "hook_point": hook_point,
        "layer": layer_index(hook_point),
        "d_model": config.get_text_config().hidden_size,
        "grid_side": vcfg.image_size // vcfg.patch_size if vcfg is not None else None,
    }


def vocab_table(samples: pa.Table, decode) -> pa.Table:
    """``(token_id, token)`` for every distinct id in ``samples.input_ids``, each decoded once by
    ``decode`` (``tokenizer.batch_decode``); the lookup :func:`with_token_strings` reads."""
    ids = pc.unique(pc.list_flatten(samples.column("input_ids"))).to_numpy(zero_copy_only=False).astype(np.int64)
    ids.sort()
    return pa.table({"token_id": pa.array(ids, pa.int32()), "token": pa.array(decode([[int(i)] for i in ids]), pa.string())})


def with_token_strings(samples: pa.Table, vocab: pa.Table) -> pa.Table:
    """``samples`` with a ``tokens`` column (list<string>, one per input id) looked up in ``vocab``."""
    flat = pc.list_flatten(samples.column("input_ids"))
    pos = pc.index_in(flat, value_set=vocab.column("token_id"))
    strings = pc.take(vocab.column("token"), pos)
    offsets = samples.column("input_ids").combine_chunks().offsets
    tokens = pa.ListArray.from_arrays(offsets, strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings)
    return samples.append_column("tokens", tokens)


def image_summary(samples: pa.Table) -> dict:
    """``n_images_used``, ``n_images_converted`` and ``converted`` (``[{"image", "reason"}]``) over the
    distinct images of a samples table (by ``image_key``, else path: a prompt pairs an image with several
    samples)."""
    images: dict[str, str | None] = {}
    for key, path, st in zip(samples.column("image_key").to_pylist(), samples.column("image_path").to_pylist(),
                             samples.column("image_status").to_pylist()):
        if path is not None:
            images.setdefault(key or path, st)
    converted = [{"image": k, "reason": st} for k, st in images.items() if st and st.startswith("converted")]
    return {"n_images_used": len(images), "n_images_converted": len(converted), "converted": converted}
