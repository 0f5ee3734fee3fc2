"""Can a request's source be read at all? A cheap check at intake, so that a row naming a missing
folder, list file or shard is rejected with its reason instead of failing inside the run.

Ray-free.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cdi_ray import storage


def probe_source(source: Any) -> str | None:
    """Why ``source`` cannot be read (None: it can). Cheap: stops at the first image of a folder,
    checks a list file and a sidecar exist, and matches shard patterns — the full listing is the
    pipeline's job, where a single unreadable image fails only itself."""
    try:
        if isinstance(source, str) and not source.rstrip("}").lower().endswith((".tar", ".parquet")):
            return _probe_folder(source)
        if isinstance(source, list):
            return None if storage.exists(source[0]) else f"the first listed image {source[0]} does not exist"
        if isinstance(source, str):
            source = {"webdataset" if source.rstrip("}").lower().endswith(".tar") else "parquet": source}
        meta = source.get("metadata")
        if meta and not storage.exists(meta):
            return f"metadata sidecar {meta} does not exist"
        if "folder" in source:
            return _probe_folder(source["folder"])
        if "list_file" in source:
            if not storage.exists(source["list_file"]):
                return f"list file {source['list_file']} does not exist"
            return None if storage.read_list_file(source["list_file"]) else f"list file {source['list_file']} names no images"
        from cdi_ray.sources import expand_pattern

        patterns = source.get("webdataset", source.get("parquet"))
        for p in [patterns] if isinstance(patterns, str) else patterns:
            expand_pattern(p)
        return None
    except FileNotFoundError as exc:
        return str(exc)
    except (OSError, ValueError) as exc:
        return f"cannot read it: {type(exc).__name__}: {exc}"


def _probe_folder(folder: str) -> str | None:
    for entry in storage.iter_files(folder):
        if Path(entry.uri).suffix.lower() in storage.IMAGE_EXTENSIONS:
            return None
    return f"no image files under {folder}"
