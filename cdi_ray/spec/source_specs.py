"""The image-source shapes a manifest may name, described and validated (listing and reading them is
:mod:`cdi_ray.sources`): a folder or prefix, a list of URIs, ``{list_file}``, ``{folder, metadata}``,
WebDataset and Parquet shards. Imports no Ray.
"""
from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field

from cdi_ray.redaction import shown
from cdi_ray.spec.limits import _NO_CREDENTIALS


class FrozenSpec(BaseModel):
    """A manifest part: unknown keys refused, immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_METADATA = "sidecar JSONL or CSV: image name (file/name/path) → label and/or caption(s)"


class ListFile(FrozenSpec):
    """A text file that lists image URIs, one per line."""

    list_file: str = Field(min_length=1, description="URI of a text file with one image URI per line")
    metadata: str | None = Field(None, min_length=1, description=_METADATA)


class ImageFolder(FrozenSpec):
    """A folder / prefix of image files with a metadata sidecar."""

    folder: str = Field(min_length=1, description="folder or s3:// prefix, listed recursively for image files")
    metadata: str | None = Field(None, min_length=1, description=_METADATA)


Pattern = Union[str, list[str]]


class WebDatasetShards(FrozenSpec):
    """WebDataset tar shards: KEY.jpg/.png… beside KEY.cls (label), KEY.txt (captions), KEY.json."""

    webdataset: Pattern = Field(description="shard URI, glob (shard-*.tar), brace range (shard-{000..099}.tar) or a list")


class ParquetShards(FrozenSpec):
    """Parquet shards: an image-bytes column beside optional metadata columns."""

    parquet: Pattern = Field(description="shard URI, glob, brace range or a list")
    image_column: str = Field("image", min_length=1, description="binary column (or {bytes, path} struct) of encoded images")
    label_column: str | None = Field(None, description="class label column (a class name or an index)")
    caption_column: str | None = Field(None, description="caption column (a string or a list of strings)")
    id_column: str | None = Field(None, description="column naming each image in reports (default: its row number)")


Source = Annotated[
    Union[str, list[str], ListFile, ImageFolder, WebDatasetShards, ParquetShards],
    Field(description="a folder/prefix, a list of image URIs, {list_file}, {folder, metadata}, "
                      "{webdataset: PATTERN} or {parquet: PATTERN, image_column, …}"),
]
SHARD_SOURCES = (WebDatasetShards, ParquetShards)


def shard_source(source: Any) -> "WebDatasetShards | ParquetShards | None":
    """The shard spec a source means (a string ending in .tar / .parquet is one), else None."""
    if isinstance(source, SHARD_SOURCES):
        return source
    if isinstance(source, str) and source.rstrip("}").lower().endswith(".tar"):
        return WebDatasetShards(webdataset=source)
    if isinstance(source, str) and source.rstrip("}").lower().endswith(".parquet"):
        return ParquetShards(parquet=source)
    return None


def source_uris(source: Any) -> list[str]:
    """Every URI / pattern a source names (for checks and relative-path resolution)."""
    if isinstance(source, str):
        return [source]
    if isinstance(source, list):
        return list(source)
    if isinstance(source, SHARD_SOURCES):
        p = source.webdataset if isinstance(source, WebDatasetShards) else source.parquet
        return [p] if isinstance(p, str) else list(p)
    main = source.list_file if isinstance(source, ListFile) else source.folder
    return [main] + ([source.metadata] if source.metadata else [])


_SUPPORTED = ("s3://", "file://")


def check_uri(value: str) -> str:
    """Local paths, ``file://`` and ``s3://`` only (other schemes fail here, not mid-run)."""
    if "://" in value and not value.startswith(_SUPPORTED):
        scheme = value.split("://", 1)[0]
        raise ValueError(f"unsupported scheme '{scheme}://' in {shown(value)} — use a local path, file:// or s3://")
    if value.startswith("s3://") and not value[5:].split("/", 1)[0]:
        raise ValueError(f"{shown(value)} names no bucket — write s3://BUCKET/PREFIX")
    if value.startswith("s3://") and "@" in value[5:].split("/", 1)[0]:
        raise ValueError(f"an s3:// location carries credentials (user:secret@) — {_NO_CREDENTIALS}")
    return value


def check_source(value: Any, field: str) -> Any:
    """A source's own problems (empty, no shards, unsupported or credential-carrying URIs) as ValueError."""
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{field} must not be empty; give a folder/prefix, a list of URIs or {{list_file: URI}}")
    if isinstance(value, list) and not value:
        raise ValueError(f"{field} is an empty list; give at least one image URI")
    if isinstance(value, list) and any((not isinstance(v, str)) or not v.strip() for v in value):
        raise ValueError(f"{field} must list non-empty URI strings")
    if isinstance(value, SHARD_SOURCES) and not source_uris(value):
        raise ValueError(f"{field} names no shards; give a shard URI, pattern or a non-empty list")
    for uri in source_uris(value):
        if not uri.strip():
            raise ValueError(f"{field} names an empty URI")
        check_uri(uri)
    return value
