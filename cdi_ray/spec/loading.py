"""Reading a manifest: YAML/JSON from a path or ``s3://``, relative paths, the operator's output root."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cdi_ray.redaction import shorten, shown
from cdi_ray.spec.messages import ManifestError, _problems
from cdi_ray.spec.schema import DEFER_REGISTRIES, Manifest
from cdi_ray.spec.source_specs import SHARD_SOURCES, ListFile, WebDatasetShards

#: Largest manifest file read (bytes): a batch of 10,000 audits is ~3 MB of YAML.
MAX_MANIFEST_BYTES = 32 << 20
#: Deepest nesting of mappings and lists in a manifest, aliases expanded (a real one nests 5 levels).
MAX_NESTING = 64
#: Most values YAML aliases may add to a manifest once expanded (a "billion laughs" file of 800
#: bytes expands to ~400 million).
MAX_ALIAS_VALUES = 1_000_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader for manifests: safe tags only, no duplicate keys (plain YAML keeps the last
    silently), bounded nesting and bounded alias expansion.

    Anchors and aliases are allowed (``yaml.safe_dump`` writes them for shared values), but what
    they expand to is counted on the node graph — each node once — before anything is built: a
    few hundred bytes of nested aliases ("billion laughs") are refused at once instead of being
    expanded by validation, and an alias that contains itself is refused too.
    """

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_NESTING} levels — a manifest "
                                                  "is a few levels deep; check the file", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        memo: dict[int, tuple[int, int]] = {}
        expanded = _expanded_size(node, memo, set(), 1)[0] if node is not None else 0
        if expanded - len(memo) > MAX_ALIAS_VALUES:
            raise yaml.composer.ComposerError(None, None, f"YAML aliases expand this manifest to {expanded:,} values "
                                              f"(more than {MAX_ALIAS_VALUES:,} beyond the {len(memo):,} written) — "
                                              "write the values out instead of nesting aliases", node.start_mark)
        return node


def _expanded_size(node, memo: dict[int, tuple[int, int]], path: set[int], depth: int) -> tuple[int, int]:
    """``(values, height)`` of ``node`` with every alias expanded; each node is counted once
    (``memo``), so this is linear in the file, not in the expansion."""
    if id(node) in path:
        raise yaml.composer.ComposerError(None, None, "a YAML alias refers to a value that contains it — a manifest "
                                          "cannot be recursive", node.start_mark)
    if id(node) not in memo:
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        path.add(id(node))
        size, height = 1, 1
        for child in children:
            got = _expanded_size(child, memo, path, depth + 1)
            size, height = size + got[0], max(height, got[1] + 1)
            if size > 100 * MAX_ALIAS_VALUES:  # far beyond the bound already: stop counting
                break
        path.discard(id(node))
        memo[id(node)] = (size, height)
    if depth + memo[id(node)][1] - 1 > MAX_NESTING:
        raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_NESTING} levels once YAML aliases are "
                                          "expanded — write the values out", node.start_mark)
    return memo[id(node)]


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} — each key may appear once in a mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


#: Environment variable naming the configured output root (the CLI's ``--output-root`` wins).
OUTPUT_ROOT_ENV = "CDI_RAY_OUTPUT_ROOT"


def output_root(explicit: str | None = None) -> str | None:
    """The operator's output root: ``explicit`` (``--output-root``), else ``$CDI_RAY_OUTPUT_ROOT``, else None (no confinement)."""
    return explicit or os.environ.get(OUTPUT_ROOT_ENV) or None


def location_problems(locations: dict[str, str | None], root: str | None) -> list[str]:
    """One problem per location (field name → URI) that escapes ``root`` (e.g. with ``..``)."""
    from cdi_ray.storage import is_within

    if not root:
        return []
    return [f"{field}: {shown(uri)} is outside the configured output root {shown(root)} — write it under the root "
            f"(set by --output-root or ${OUTPUT_ROOT_ENV})"
            for field, uri in locations.items() if uri is not None and not is_within(uri, root)]


def parse_manifest(data: Any, *, base_dir: str | None = None, source: str | None = None,
                   root: str | None = None, registries: bool = True) -> Manifest:
    """Validate already-parsed manifest data; relative local paths resolve against ``base_dir``.

    ``root`` (default :func:`output_root`): ``output`` and ``feature_store`` must lie under it.
    ``registries=False`` leaves the checks against the feature registry and the test procedures
    (seconds of imports) for :func:`check_registries`: a command runs them while Ray starts.
    """
    if not isinstance(data, dict):
        raise ManifestError([f"(manifest): expected a mapping with keys models, audits, output; got {type(data).__name__}"], source)
    try:
        manifest = Manifest.model_validate(data, context={DEFER_REGISTRIES: not registries})
    except ValidationError as exc:
        raise ManifestError(_problems(exc), source) from None
    if base_dir is not None:
        manifest = _resolve_relative(manifest, base_dir)
    problems = location_problems({"output": manifest.output, "feature_store": manifest.feature_store}, output_root(root))
    if problems:
        raise ManifestError(problems, source)
    return manifest


def check_registries(manifest: Manifest, source: str | None = None) -> Manifest:
    """The checks :func:`parse_manifest` left out with ``registries=False``; the manifest if it passes.

    Raises:
        ManifestError: the same problems, worded the same, as a full validation reports.
    """
    problems = manifest.registry_problems()
    if problems:
        raise ManifestError(problems, source)
    return manifest


def load_manifest(path_or_uri: str | os.PathLike, *, root: str | None = None, registries: bool = True) -> Manifest:
    """Read, parse and validate a manifest (local path, ``file://`` or ``s3://``); ``root`` and
    ``registries`` as in :func:`parse_manifest`.

    Raises:
        ManifestError: the file is unreadable, not YAML/JSON, or invalid; ``.problems`` lists each issue.
    """
    from cdi_ray import storage

    uri = str(path_or_uri)
    try:
        raw = storage.read_bytes(uri, max_bytes=MAX_MANIFEST_BYTES, what="manifest")
    except FileNotFoundError:
        raise ManifestError([f"(file): {uri} does not exist — check the path"], uri) from None
    except OSError as exc:
        raise ManifestError([f"(file): cannot read {uri}: {exc}"], uri) from None
    except ValueError as exc:  # an unsupported scheme
        raise ManifestError([f"(file): {exc}"], uri) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(["(file): not UTF-8 text — save the manifest as UTF-8 YAML or JSON"], uri) from None
    try:
        if uri.endswith(".json"):
            data = json.loads(text)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # YAML is a superset of JSON
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ManifestError([f"(file): not valid YAML/JSON — {shorten(str(exc), 400)}"], uri) from None
    except RecursionError:  # JSON nested thousands deep (the YAML loader stops at MAX_NESTING)
        raise ManifestError(["(file): nested deeper than Python can parse — a manifest is a few levels deep"],
                            uri) from None
    base_dir = None if storage.is_remote(uri) else str(Path(storage.local_path(uri)).parent)
    return parse_manifest(data, base_dir=base_dir, source=uri, root=root, registries=registries)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _abs(uri: str, base_dir: str) -> str:
    if _SCHEME.match(uri) or os.path.isabs(uri) or uri.startswith("~"):
        return os.path.expanduser(uri) if uri.startswith("~") else uri
    return os.path.normpath(os.path.join(base_dir, uri))


def _resolve_relative(m: Manifest, base_dir: str) -> Manifest:
    def src(s):
        if isinstance(s, str):
            return _abs(s, base_dir)
        if isinstance(s, list):
            return [_abs(u, base_dir) for u in s]
        if isinstance(s, SHARD_SOURCES):
            name = "webdataset" if isinstance(s, WebDatasetShards) else "parquet"
            p = getattr(s, name)
            return s.model_copy(update={name: _abs(p, base_dir) if isinstance(p, str) else [_abs(u, base_dir) for u in p]})
        main = "list_file" if isinstance(s, ListFile) else "folder"
        return s.model_copy(update={main: _abs(getattr(s, main), base_dir),
                                    "metadata": _abs(s.metadata, base_dir) if s.metadata else None})

    def labels(spec):
        return spec.model_copy(update={"map": _abs(spec.map, base_dir)}) if isinstance(spec.map, str) else spec

    models = {k: v.model_copy(update={"uri": _abs(v.uri, base_dir)}) for k, v in m.models.items()}
    audits = [
        a.model_copy(update={"published": src(a.published), "unpublished": src(a.unpublished), "labels": labels(a.labels)})
        for a in m.audits
    ]
    update: dict[str, Any] = {"models": models, "audits": audits, "output": _abs(m.output, base_dir)}
    if m.feature_store:
        update["feature_store"] = _abs(m.feature_store, base_dir)
    return m.model_copy(update=update)
