"""The ingest handler in a bare FastAPI/Starlette app: the benchmark's reference.

Run by benchmarks/ingest.py under uvicorn; writes to ``$RAYLINE_BENCH_TOPIC``.
"""

from __future__ import annotations

import dataclasses
import gc
import os

from fastapi import FastAPI

from cluster.deploy import edge_config
from cluster.settings import load_settings
from serve_apps.edge import IngestEdge
from serve_apps.ingest_routes import add_routes

_config = edge_config(load_settings())
_config = dataclasses.replace(_config, topic=os.environ["RAYLINE_BENCH_TOPIC"], max_consumer_lag=0)
_edge = IngestEdge(_config)

app = FastAPI(title="bare ingest (benchmark reference)")
add_routes(app, _edge)
gc.freeze()  # as the Serve replica does
