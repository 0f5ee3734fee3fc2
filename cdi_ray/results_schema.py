"""The documented schema of cdi-ray's JSON results, as pydantic models.

``docs/results.schema.json`` (JSON Schema 2020-12) is generated from these models by
:func:`schema_json` — regenerate it with ``python -m cdi_ray.results_schema`` after changing
them; a test checks that the shipped file equals the generated one and that real results
validate against it. Its root is ``results.json`` (:class:`ResultsFile`); ``$defs/AuditDocument``
is ``audits/<audit_id>.json`` (:class:`AuditDocument`), the JSON a per-audit HTML report is
rendered from. docs/REPORTS.md describes the fields in prose.

The writers are :mod:`cdi_ray.pipeline.results` (``build_entries``, ``audit_document``) and
:func:`cdi_ray.pipeline.aggregate.report_payload`; these models only describe and check what
they write. Fields are added, never renamed: a consumer of v1 keeps working.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "results.schema.json"

Verdict = Literal["used", "not_detected", "inconclusive"]
Status = Literal["done", "failed"]
Direction = Literal["P>U", "P<U", "none"]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


# ----------------------------------------------------------------------------------------------
# results.json
# ----------------------------------------------------------------------------------------------
class UnusableImage(_Closed):
    """A listed image the audit could not use, and why."""

    set: Literal["published", "unpublished"]
    uri: str
    content_hash: str | None = Field(description="sha256 of the file bytes; null if the file could not be read")
    reason: str = Field(description="e.g. missing, unreadable, duplicate_content, in_both_sets, a decode error")


class SeparatingDescriptor(_Closed):
    descriptor: str
    group: str | None = None
    auc: float | None = None


class ControlEntry(_Closed):
    """One distribution-shift control run for an audit (docs/VERDICTS.md §2)."""

    name: str = Field(description="model-free or reference-model")
    fired: bool = Field(description="true: a shift between P and U cannot be ruled out; the verdict is inconclusive")
    pvalue: float | None
    alpha: float
    reason: str
    n_published: int | None = None
    n_unpublished: int | None = None
    statistic: float | None = None
    auc: float | None = None
    separating: list[SeparatingDescriptor] = Field(default_factory=list)


class StandingLook(_Closed):
    """A standing audit's night under its life-long rule (nightly runs only; docs/VERDICTS.md §5)."""

    night: int = Field(ge=1, description="nights this audit was tested, tonight included")
    date: str = Field(description="tonight (YYYY-MM-DD)")
    first_night: str
    look: int = Field(ge=0, description="looks taken so far (0: none yet)")
    took_look: bool = Field(description="tonight tested new images; false: nothing changed, no α spent")
    first_look_on: str | None
    alpha: float | None = Field(description="the audit's life-long α (null before its first look)")
    alpha_spent: float = Field(ge=0, description="part of α spent so far")
    alpha_remaining: float | None
    level: float | None = Field(description="nominal level of the latest look")
    nominal_pvalue: float | None = Field(description="the accumulated evidence as a nominal p-value")
    may_say_used: bool
    used_on_look: int | None
    used_on: str | None
    reason: str | None
    state: str = Field(description="the stored state this night wrote (<root>/<date>/sequential/<audit_id>.json)")


class AuditEntry(_Closed):
    """One audit of ``results.json`` (one row of ``results.parquet``, plus ``controls`` and ``unusable_images``)."""

    audit_id: str
    model: str = Field(description="the model's name in the manifest")
    model_fingerprint: str | None = Field(description="content fingerprint of the model's weights and config")
    feature_key: str | None = Field(description="feature-store partition (hash of the feature config and model loading)")
    status: Status
    verdict: Verdict
    verdict_reason: str = Field(description="one sentence a non-statistician can read")
    p_value: float | None = Field(description="one-sided p-value of 'P scores higher than U'; null if not tested")
    p_adjusted: float | None = Field(description="p-value adjusted for the batch (fdr.method); null if not tested or none")
    fdr_reject: bool
    n_published: int = Field(ge=0, description="n_P: published images used")
    n_unpublished: int = Field(ge=0, description="n_U: unpublished images used")
    statistic: float | None
    effect_size: float | None = Field(description="Cohen's d of the held-out scores")
    auc: float | None = Field(description="AUC of the held-out scores (P above U)")
    direction: Direction | None
    procedure: str | None
    feature_calibration: str = Field(
        "none", description="'none', or 'reference:<model>' when the test saw the audited model's features minus that "
                            "reference model's on the same images")
    calibrated: bool | None
    alpha: float = Field(gt=0, lt=1)
    seed: int = Field(ge=0)
    error: str | None
    controls_fired: str = Field(description="comma-separated names of the controls that fired, empty if none")
    controls: list[ControlEntry]
    n_unusable: int = Field(ge=0)
    unusable_images: list[UnusableImage]
    sequential: StandingLook | None = Field(None, description="nightly runs: the standing audit's night, looks and "
                                                              "α spent under its life-long rule")


class FdrSection(_Closed):
    method: Literal["bh", "by", "bonferroni", "none"]
    q: float
    n_tested: int = Field(ge=0, description="audits that produced a p-value (the m of the adjustment)")


class Summary(_Closed):
    audits: int
    done: int
    failed: int
    used: int
    not_detected: int
    inconclusive: int


class RunSection(_Open):
    """Timings and compute counters of one run (differs between runs of the same manifest)."""

    run_id: str | None = None
    output: str | None = None
    feature_store: str | None = None
    manifest_hash: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    timings: dict[str, float] = Field(default_factory=dict)


class ResultsFile(_Closed):
    """``results.json``: everything but ``run`` is a pure function of the manifest and the stored features."""

    schema_: Literal["cdi-ray/results/v1"] = Field(alias="schema")
    fdr: FdrSection
    summary: Summary
    audits: list[AuditEntry]
    run: RunSection


# ----------------------------------------------------------------------------------------------
# audits/<audit_id>.json
# ----------------------------------------------------------------------------------------------
class Collection(_Closed):
    n: int = Field(ge=0, description="images used")
    fingerprint: str = Field(description="sha256 of the sorted content hashes of the images used, one per line")


class Collections(_Closed):
    published: Collection
    unpublished: Collection


class Histogram(_Closed):
    edges: list[float] = Field(description="bin edges shared by P and U (bins + 1 values)")
    published: list[int]
    unpublished: list[int]


class ScoreSummary(_Closed):
    n: int
    mean: float | None = None
    sd: float | None = None
    q05: float | None = None
    q25: float | None = None
    median: float | None = None
    q75: float | None = None
    q95: float | None = None


class Scores(_Closed):
    histogram: Histogram
    published: ScoreSummary
    unpublished: ScoreSummary
    held_out: bool = Field(description="true: each score comes from a scorer not fitted on that image")


class FeatureRow(_Closed):
    feature: str
    auc: float | None = Field(description="single-feature AUC, P above U, on all images (descriptive)")
    mean_difference: float | None = Field(description="mean of P minus mean of U in pooled-SD units")
    weight: float | None = Field(description="ridge-discriminant weight on the standardized feature, fit on all images")
    share: float | None = Field(description="|weight| / Σ|weight|")


class CurvePoint(_Closed):
    n_published: int
    n_unpublished: int
    pvalue: float | None
    error: str | None = None


class PValueCurve(_Closed):
    points: list[CurvePoint]
    max_permutations: int | None = None
    skipped: str | None = Field(None, description="why no curve was computed")


class ReportPayload(_Closed):
    """What the report plots (bounded in size whatever n_P and n_U), from the aggregator."""

    collections: Collections
    scores: Scores
    features: list[FeatureRow]
    pvalue_curve: PValueCurve
    test: dict[str, Any] = Field(description="TestResult.to_dict(): p-values, permutations, options used")


class ReportError(_Closed):
    error: str


class Provenance(_Open):
    """What a third party needs to re-run the audit."""

    manifest_hash: str | None = None
    manifest_entry: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    feature_key: str | None = None
    feature_config: dict[str, Any] | None = None
    seed: int | None = None
    controls: dict[str, Any] | None = None
    fdr: dict[str, Any] | None = None
    software: dict[str, str | None] | None = None
    run: dict[str, Any] | None = None


class AuditDocument(_Closed):
    """``audits/<audit_id>.json``: the JSON the per-audit HTML report is rendered from."""

    schema_: Literal["cdi-ray/audit/v1"] = Field(alias="schema")
    audit: AuditEntry = Field(description="the audit's results.json entry, unchanged")
    fdr: FdrSection
    report: ReportPayload | ReportError | None = Field(description="null for an audit that was not tested")
    provenance: Provenance


def schema() -> dict:
    """JSON Schema of ``results.json`` with ``$defs/AuditDocument`` for ``audits/<audit_id>.json``."""
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema([(ResultsFile, "validation"), (AuditDocument, "validation")],
                                 ref_template="#/$defs/{model}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "cdi-ray results (results.json); $defs/AuditDocument is audits/<audit_id>.json",
        "$ref": "#/$defs/ResultsFile",
        **defs,
    }


def schema_json() -> str:
    """:func:`schema` as the text shipped in ``docs/results.schema.json``."""
    return json.dumps(schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    SCHEMA_PATH.write_text(schema_json())
    print(f"wrote {SCHEMA_PATH}")


if __name__ == "__main__":
    main()
