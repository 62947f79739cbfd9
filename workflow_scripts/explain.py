"""Entry point of rule explain_chunk: explanations for one chunk of the selected features."""

import json
from pathlib import Path

import polars as pl

from mmsae.explain import Explainer, build_requests, endpoint_session, explain_features
from mmsae.explain.batch import shown_examples
from mmsae.explain.cache import ResponseCache
from mmsae.core.io import write_parquet
from mmsae.codes.schema import TEXT_DOMINANT
from mmsae.core.job import endpoint_runtime, setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
e = {**sm.params.endpoint, **endpoint_runtime(sm.config["explain"])}  # runtime settings are not params
chunk, n_chunks = int(sm.wildcards.chunk), sm.params.n_chunks
features = json.loads(Path(sm.input.selected).read_text())["features"][chunk::n_chunks]
maps_dir = Path(sm.input.maps).parent
text_dominant = set(pl.read_parquet(sm.input.stats).filter(TEXT_DOMINANT)["feature"])
maps, contexts = pl.read_parquet(sm.input.maps), pl.read_parquet(sm.input.contexts)
requests = build_requests(features, maps, contexts, maps_dir, max_images=sm.params.max_images, text_dominant=text_dominant)
shown = shown_examples(requests, maps, contexts, pl.read_parquet(sm.input.top))
log.info("chunk %d/%d: %d features, %d with images or contexts", chunk, n_chunks, len(features), len(requests))

cache = ResponseCache(sm.params.cache)
with endpoint_session(e, server_log=sm.log[0] + ".server", pid_dir=str(Path(sm.params.slots).parent / ".servers")) as cfg:
    explainer = Explainer(cfg, cache, slots_dir=sm.params.slots)
    table = explain_features(requests, explainer, shown)
cache.close()
write_parquet(sm.output[0], table)
status = table.column("status").to_pylist()
log.info("sent %d requests (%d answered from cache); %s", explainer.sent, sum(table.column("cached").to_pylist()),
         {s: status.count(s) for s in sorted(set(status))})
