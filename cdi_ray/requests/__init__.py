"""Bulk dataset-owner requests: many owners, each with a published and an unpublished collection,
each asking "was any of these models trained on my pictures?" (README "Bulk requests").

    run_requests(requests_file, registry_file, out)   # intake → audits → owner-family verdicts → deliverables → ledger
    verify_request(request_dir)                       # re-run one owner's tests from the stored features

Modules, one job each: :mod:`.intake` (requests file and registry → typed requests / rejections),
:mod:`.probe` (can a source be read), :mod:`.expand` (requests → audits), :mod:`.engine` (the
pipeline's stages, and each test's record), :mod:`.family` (Holm within each owner's request),
:mod:`.deliverable` and :mod:`.evidence` (the owner's folder), :mod:`.page` (its HTML),
:mod:`.ledger` (requests.parquet, rejected.csv), :mod:`.verify`, :mod:`.conductor` (the whole
job), :mod:`.commands` (``cdi-ray requests`` / ``verify``).
"""
from __future__ import annotations

import importlib

#: Public names → the module that defines them (imported on first use, so that `cdi-ray --help`
#: does not pay for pyarrow and the statistics stack).
_EXPORTS = {"run_requests": "conductor", "RequestsRun": "conductor", "verify_request": "verify",
            "Verification": "verify", "holm": "family", "load_registry": "intake", "read_requests": "intake",
            "Registry": "intake", "Request": "intake", "Rejection": "intake", "Intake": "intake",
            "IntakeError": "intake"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
