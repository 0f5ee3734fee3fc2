"""Image collections as they are stored — every source shape in one room.

A manifest source (:mod:`cdi_ray.spec` describes and validates them) is one of:

* **loose files** — a folder or S3 prefix (listed recursively for image files), a list of image
  URIs, or a list file; optionally with a **sidecar** (JSONL or CSV: image name → ``label`` /
  ``caption(s)``);
* **WebDataset tar shards** — ``shard-000123.tar`` holding ``KEY.jpg`` / ``KEY.png`` beside
  ``KEY.cls`` (class label), ``KEY.txt`` (caption(s), one per line) and/or ``KEY.json``
  (``label``, ``caption`` or ``captions``). ``KEY`` is a member's path up to the first ``.`` of
  its file name;
* **Parquet shards** — an image-bytes column (binary, or a ``{bytes, path}`` struct as Hugging
  Face ``datasets`` writes it) beside optional label / caption / id columns.

Shard *patterns* name many shards: a glob (``s3://b/p/shard-*.tar``), a brace range
(``shard-{000000..000099}.tar``) or alternatives (``{a,b}.parquet``).

Every image gets a URI that names it in reports — the file's own URI, ``SHARD#KEY.ext`` for a
tar member, ``SHARD#ID`` (or ``SHARD#row=N``) for a Parquet row — and a *locator* that says how
to get its bytes back without scanning the shard again: ``""`` (the whole object),
``tar:OFFSET:SIZE`` (one ranged read), ``parquet:ROW_GROUP:ROW:COLUMN``. An image's identity
is the sha256 of its encoded bytes, whatever container it came in
(:func:`cdi_ray.images.content_hash`).

Modules, one job each: :mod:`.records` (an image entry, a shard reference, the listing table),
:mod:`.listing` (a source → its images or shards),
:mod:`.sidecar` (metadata of loose files), :mod:`.shards` (indexing one shard, and its cached
index), :mod:`.reading` (bytes back by locator). Ray-free; the pipeline runs these functions in
Ray tasks (:mod:`cdi_ray.pipeline.listing`).
"""
from cdi_ray.sources.listing import expand_braces, expand_pattern, list_source, shard_spec, source_id
from cdi_ray.sources.records import (LISTING_COLUMNS, LISTING_SCHEMA, ImageEntry, ShardRef, ShardSpec, entries_table,
                                     read_listing, table_entries)
from cdi_ray.sources.reading import PARQUET, TAR, container_of, open_seekable, open_stream, read_images, read_range
from cdi_ray.sources.shards import (INDEX_FOLDER, INDEX_SCHEMA, ShardIndex, index_parquet, index_shard,
                                    index_shard_cached, index_table, index_tar, shard_cache_name)
from cdi_ray.sources.sidecar import attach_sidecar, parse_captions, parse_label, read_sidecar

__all__ = ["ImageEntry", "ShardSpec", "ShardRef", "LISTING_SCHEMA", "LISTING_COLUMNS", "entries_table", "table_entries",
           "read_listing", "expand_braces", "expand_pattern", "list_source", "shard_spec", "source_id",
           "read_images", "read_range", "open_seekable", "open_stream", "container_of", "TAR", "PARQUET",
           "index_tar", "index_parquet", "index_shard", "index_shard_cached", "index_table", "shard_cache_name",
           "ShardIndex", "INDEX_FOLDER", "INDEX_SCHEMA", "read_sidecar", "attach_sidecar", "parse_label",
           "parse_captions"]
