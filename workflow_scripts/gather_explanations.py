"""Entry point of rule gather_explanations: one table from the chunks; failures counted."""

import pyarrow as pa
import pyarrow.parquet as pq

from mmsae.explain import EXPLANATION_SCHEMA
from mmsae.core.io import write_parquet
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
tables = [pq.read_table(p).cast(EXPLANATION_SCHEMA) for p in sm.input]
table = pa.concat_tables(tables).sort_by("feature") if tables else EXPLANATION_SCHEMA.empty_table()
write_parquet(sm.output[0], table)
status = table.column("status").to_pylist()
counts = {s: status.count(s) for s in sorted(set(status))}
log.info("%d features: %s", table.num_rows, counts)
if counts.get("failed"):
    log.warning("%d explanation requests failed after retries; their errors are in the table", counts["failed"])
