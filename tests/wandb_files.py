"""Reading offline W&B runs back in tests: the run record (group, tags, job type), history rows and summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

from flbench.results.wandb_logger import run_file_records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(folder: Path) -> dict[str, Any]:
    """{'group', 'tags', 'job_type', 'name', 'history': [row, ...], 'summary': {...}} of one offline run folder."""
    (path,) = folder.glob("run-*.wandb")
    out: dict[str, Any] = {"history": [], "summary": {}}
    for data in run_file_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(group=record.run.run_group, tags=list(record.run.tags), job_type=record.run.job_type,
                       name=record.run.display_name)
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    return out


def offline_runs(results: Path) -> list[dict[str, Any]]:
    """Every offline run under `<results>/wandb/` (where flbench puts them), in start order."""
    return [read_run(folder) for folder in sorted(results.glob("wandb/offline-run-*"))]
