"""Entry point of rule refine_explanations: a short phrase (refiner) and a concept category (categorizer) per explanation."""

from pathlib import Path

import polars as pl
import pyarrow as pa

from mmsae.evaluate.refine import REFINE_VERSION, label_categories, refine_all, refine_phrases
from mmsae.explain import Explainer, endpoint_session
from mmsae.explain.cache import ResponseCache
from mmsae.core.io import write_parquet
from mmsae.core.job import endpoint_runtime, setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
ok = ["ok", "untagged"] if sm.params.include_untagged else ["ok"]
expl = pl.read_parquet(sm.input.explanations).filter(pl.col("status").is_in(ok))
pairs = list(zip(expl["feature"].to_list(), expl["explanation"].to_list()))
rows = []
cache = ResponseCache(sm.params.cache)
servers = str(Path(sm.params.slots).parent / ".servers")  # records of local servers (reaped if orphaned)
runtime = endpoint_runtime(sm.config["explain"], sm.config["evaluate"]["refiner"])
refiner_endpoint = {**sm.params.endpoint, **runtime}
categorizer_key = sm.config["evaluate"]["categorizer"].get("api_key_env")  # null: the refiner's
categorizer_endpoint = {**sm.params.categorizer, **runtime, **({"api_key_env": categorizer_key} if categorizer_key else {})}
if pairs and categorizer_endpoint == refiner_endpoint:  # one endpoint and key (the default): one session
    with endpoint_session(refiner_endpoint, server_log=sm.log[0] + ".server", pid_dir=servers) as cfg:
        refiner = Explainer(cfg, cache, slots_dir=sm.params.slots)
        rows = refine_all(refiner, refiner, pairs)
elif pairs:  # the categorizer is another endpoint (paper: a 70B model): one session after the other
    with endpoint_session(refiner_endpoint, server_log=sm.log[0] + ".server", pid_dir=servers) as cfg:
        rows = refine_phrases(Explainer(cfg, cache, slots_dir=sm.params.slots), pairs)
    if any(r["phrase"] for r in rows):
        with endpoint_session(categorizer_endpoint, server_log=sm.log[0] + ".categorizer-server", pid_dir=servers) as cfg:
            label_categories(Explainer(cfg, cache, slots_dir=sm.params.slots), rows)
schema = pa.schema([("feature", pa.int32()), ("phrase", pa.string()), ("category", pa.string()),
                    ("refine_status", pa.string()), ("category_status", pa.string()), ("raw_phrase", pa.string()),
                    ("raw_category", pa.string()), ("error", pa.string()), ("prompt_version", pa.string())])
write_parquet(sm.output[0], pa.Table.from_pylist([{**r, "prompt_version": REFINE_VERSION} for r in rows], schema=schema))
log.info("%d explanations refined: %d phrases, %d categories", len(rows), sum(r["phrase"] is not None for r in rows),
         sum(r["category"] is not None for r in rows))
