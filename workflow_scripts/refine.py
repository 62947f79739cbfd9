"""Entry point of rule refine_explanations: a short phrase and a concept category per explanation."""

import polars as pl
import pyarrow as pa

from mmsae.evaluate.refine import REFINE_VERSION, refine_all
from mmsae.explain import Explainer, endpoint_session
from mmsae.explain.cache import ResponseCache
from mmsae.io import write_parquet
from mmsae.workflow import endpoint_runtime, setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
ok = ["ok", "untagged"] if sm.params.include_untagged else ["ok"]
expl = pl.read_parquet(sm.input.explanations).filter(pl.col("status").is_in(ok))
pairs = list(zip(expl["feature"].to_list(), expl["explanation"].to_list()))
rows = []
if pairs:
    with endpoint_session({**sm.params.endpoint, **endpoint_runtime(sm.config["explain"], sm.config["evaluate"]["refiner"])}, server_log=sm.log[0] + ".server") as cfg:
        rows = refine_all(Explainer(cfg, ResponseCache(sm.params.cache), slots_dir=sm.params.slots), pairs)
schema = pa.schema([("feature", pa.int32()), ("phrase", pa.string()), ("category", pa.string()),
                    ("refine_status", pa.string()), ("category_status", pa.string()), ("raw_phrase", pa.string()),
                    ("raw_category", pa.string()), ("error", pa.string()), ("prompt_version", pa.string())])
write_parquet(sm.output[0], pa.Table.from_pylist([{**r, "prompt_version": REFINE_VERSION} for r in rows], schema=schema))
log.info("%d explanations refined: %d phrases, %d categories", len(rows), sum(r["phrase"] is not None for r in rows),
         sum(r["category"] is not None for r in rows))
