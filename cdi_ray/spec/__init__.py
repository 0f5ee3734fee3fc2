"""The audit manifest: which models, which audits, where results go.

A manifest is YAML or JSON, validated once at load time with pydantic (``extra="forbid"``,
frozen) and trusted everywhere after. The smallest valid manifest::

    models: {sd-mini: {uri: s3://models/sd-mini}}
    audits:
      - {id: artist-042, model: sd-mini,
         published: s3://owners/artist-042/published/,
         unpublished: s3://owners/artist-042/unpublished/}
    output: s3://audits/2026-11-28/

An image source (``published`` / ``unpublished``) is one of

* a string — a folder or an S3 prefix, listed recursively for image files;
* a list of image URIs;
* ``{list_file: URI}`` — a text file with one image URI per line (``#`` comments and blank
  lines ignored; relative entries are taken relative to the list file);
* ``{folder: URI, metadata: URI}`` — a folder/prefix with a sidecar (JSONL or CSV: image name →
  ``label`` / ``caption(s)``; ``list_file`` takes ``metadata`` too);
* ``{webdataset: PATTERN}`` — WebDataset tar shards (``KEY.jpg`` + ``KEY.cls`` / ``.txt`` /
  ``.json``); PATTERN is a URI, a glob (``shard-*.tar``), a brace range
  (``shard-{000000..000099}.tar``) or a list of them. A string source ending in ``.tar`` means
  the same;
* ``{parquet: PATTERN, image_column: image, label_column: …, caption_column: …, id_column: …}``
  — Parquet shards (a string source ending in ``.parquet`` means the same with the defaults).

An audit's ``labels: {map: …, missing: error|null}`` maps the collection's label names onto the
model's class indices and says what a class-conditional model does with unlabelled images
(:mod:`cdi_ray.conditioning`).

Relative local paths in a manifest are resolved against the manifest's own folder, so a
manifest and its data can travel together (``ray job submit --working-dir .``).

Errors name the field and the fix, e.g.::

    audits[0].model: unknown model 'sd-mni' — use one of the names under `models:` (sd-mini)

Credentials never appear here: storage is reached with the environment's / instance
role's credentials (see :mod:`cdi_ray.storage`); a manifest that tries to carry one (an
``s3://user:secret@…`` location, a credential-like key in ``options`` / ``overrides``, which are
copied into reports) is refused. With an output root configured (``--output-root`` /
``$CDI_RAY_OUTPUT_ROOT``), ``output`` and ``feature_store`` must lie under it. This package imports no Ray:

* :mod:`.schema` — the pydantic models and their cross-field checks;
* :mod:`.source_specs` — the image-source shapes and their checks;
* :mod:`.messages` — validation errors as readable ``field: what — fix`` lines;
* :mod:`.loading` — YAML/JSON from a path or ``s3://``, relative paths, the output root.
"""
from cdi_ray.spec.loading import (OUTPUT_ROOT_ENV, check_registries, load_manifest, location_problems, output_root,
                                  parse_manifest)
from cdi_ray.spec.messages import ManifestError
from cdi_ray.spec.schema import (AUDIT_ID_PATTERN, MODEL_NAME_PATTERN, Access, AuditSpec, ControlsSpec, FdrSpec,
                                 LabelsSpec, Manifest, ModelSpec, Preset, TestSpec, json_schema)
from cdi_ray.spec.source_specs import (SHARD_SOURCES, ImageFolder, ListFile, ParquetShards, Source, WebDatasetShards,
                                       shard_source, source_uris)

__all__ = ["Manifest", "ModelSpec", "AuditSpec", "TestSpec", "ControlsSpec", "LabelsSpec", "FdrSpec", "ListFile",
           "ImageFolder", "WebDatasetShards", "ParquetShards", "Source", "SHARD_SOURCES", "Access", "Preset",
           "AUDIT_ID_PATTERN", "MODEL_NAME_PATTERN", "shard_source", "source_uris", "json_schema", "ManifestError",
           "load_manifest", "parse_manifest", "check_registries", "location_problems", "output_root", "OUTPUT_ROOT_ENV"]
