"""The v2 protocol's descriptive documents, built once as JSON-shaped dicts for both front ends.

HTTP sends these dicts as they are; gRPC parses the same dicts into its messages (protobuf's json_format uses
the field names of the spec, which the JSON documents share), so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from recserve.serve.engine import MODEL_VERSION, SERVER_NAME, ModelStatistics
from recserve.serve.repository import ServedModel

PLATFORM = "recserve_pytorch"


def server_metadata(extensions: list[str]) -> dict[str, Any]:
    from recserve import __version__

    return {"name": SERVER_NAME, "version": __version__, "extensions": extensions}


def model_metadata_json(model: ServedModel) -> dict[str, Any]:
    signature = model.signature

    def tensors(specs: list) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatypes[0], "shape": list(t.shape)} for t in specs]

    return {"name": model.name, "versions": [MODEL_VERSION], "platform": PLATFORM,
            "inputs": tensors(signature.inputs), "outputs": tensors(signature.outputs)}


def model_config_json(model: ServedModel) -> dict[str, Any]:
    signature = model.signature

    def tensors(specs: list) -> list[dict[str, Any]]:
        return [{"name": t.name, "data_type": f"TYPE_{t.datatypes[0]}", "dims": list(t.shape)} for t in specs]

    spec = signature.spec
    return {
        "name": model.name, "platform": PLATFORM, "backend": "recserve", "max_batch_size": 0,
        "input": tensors(signature.inputs), "output": tensors(signature.outputs),
        "parameters": {key: {"string_value": str(value)} for key, value in {
            "model": spec.name, "tables": len(spec.tables), "num_tasks": spec.num_tasks,
            "max_items": signature.max_items,
        }.items()},
    }


def statistics_json(name: str, stats: ModelStatistics) -> dict[str, Any]:
    def duration(pair: list[int]) -> dict[str, int]:
        return {"count": pair[0], "ns": pair[1]}

    return {
        "name": name, "version": MODEL_VERSION, "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count, "execution_count": stats.execution_count,
        "inference_stats": {
            "success": duration(stats.success), "fail": duration(stats.fail), "queue": duration(stats.queue),
            "compute_infer": duration(stats.compute),
        },
    }
