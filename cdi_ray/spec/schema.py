"""The manifest's schema: which models, which audits, where results go — as frozen pydantic models.

Validated once at load time (``extra="forbid"``, frozen) and trusted everywhere after; the
cross-field checks (unknown models, duplicate ids, features a gray-box model cannot compute,
procedure options) run here too, and every problem is one ``"field.path: what — fix"`` line.
The image sources an audit names are described in :mod:`cdi_ray.spec.source_specs`. It imports no Ray.
"""
from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from cdi_ray.spec.limits import INT64_MAX, check_no_credential_keys, value_problems
from cdi_ray.spec.source_specs import FrozenSpec, Source, check_source, check_uri

Access = Literal["white-box", "gray-box"]
Preset = Literal["white-box", "gray-box", "efficient"]

#: Audit ids become file names and partition values: keep them path-safe.
AUDIT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

__all__ = ["Access", "Preset", "AUDIT_ID_PATTERN", "MODEL_NAME_PATTERN", "ModelSpec", "TestSpec", "ControlsSpec",
           "LabelsSpec", "AuditSpec", "FdrSpec", "Manifest", "DEFER_REGISTRIES", "json_schema"]


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
class ModelSpec(FrozenSpec):
    """One diffusion model and how its feature actors are scheduled."""

    uri: str = Field(min_length=1, description="local folder or s3:// prefix of a diffusers pipeline")
    access: Access = Field("white-box", description="white-box allows gradients (all 26 features); gray-box forward passes only")
    batch_size: int = Field(32, gt=0, le=65536, description="images per feature-actor call")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per feature actor (0 on CPU clusters)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per feature actor")
    min_replicas: int = Field(1, ge=1, description="smallest feature-actor pool (ActorPoolStrategy min_size)")
    max_replicas: int = Field(1, ge=1, description="largest feature-actor pool (ActorPoolStrategy max_size)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when num_gpus > 0, else cpu")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="weight dtype; non-float32 also runs f under autocast")
    options: dict[str, Any] = Field(default_factory=dict, description="family options for the loader, e.g. {missing_label: null}")
    max_batch_mb: float | None = Field(None, gt=0, description="ceiling on one feature call's input tensor (MB); a larger call "
                                                               "fails as out of memory and is split in halves — emulates a smaller accelerator")
    pool: Literal["auto", "actors", "tasks"] = Field(
        "auto", description="how a feature stream runs the model: actors — an actor pool, one model load per actor; "
                            "tasks — Ray tasks whose worker processes keep the model stack imported and the last model "
                            "loaded between streams and runs (CPU only); auto — tasks for a CPU stream of at most "
                            "1,024 images, where an actor's start-up would cost more than its features, else actors")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v):
        return check_uri(v)

    @field_validator("options")
    @classmethod
    def _options(cls, v):
        return check_no_credential_keys(v, "options")

    @model_validator(mode="after")
    def _pool(self) -> "ModelSpec":
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is smaller than min_replicas ({self.min_replicas}); "
                "raise max_replicas or lower min_replicas"
            )
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("device is 'cuda' but num_gpus is 0; set num_gpus (e.g. 1) or device: cpu")
        if self.pool == "tasks" and self.resolved_device != "cpu":
            raise ValueError("pool 'tasks' keeps models loaded in shared worker processes and is for CPU models; "
                             "use pool: actors (or auto) with GPUs")
        return self

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus > 0 else "cpu"


# ----------------------------------------------------------------------------------------------
# audits
# ----------------------------------------------------------------------------------------------
class TestSpec(FrozenSpec):
    """How one audit's P-vs-U test is run (see cdi_ray.stats.run_test)."""

    __test__ = False  # not a pytest class

    procedure: str = Field("crossfit-permutation", min_length=1, description="a procedure name known to cdi_ray.stats")
    alpha: float = Field(0.01, gt=0, lt=1, description="per-audit significance level (used when fdr.method is none)")
    options: dict[str, Any] = Field(default_factory=dict, description="procedure options, e.g. {max_permutations: 999}")
    min_samples: int | None = Field(None, ge=1, description="fewer usable images per side → inconclusive; default: cdi_ray.stats.MIN_SAMPLES")

    @field_validator("options")
    @classmethod
    def _options(cls, v):
        return check_no_credential_keys(v, "options")


class ControlsSpec(FrozenSpec):
    """Distribution-shift guards run with every audit (docs/VERDICTS.md).

    On by default. Turn one off for the whole batch with ``controls: {model_free: false}`` at the
    top of the manifest, or for one audit with the same key inside that audit (an audit's own
    ``controls`` replaces the batch's).
    """

    model_free: bool = Field(True, description="run the model-free control (image descriptors alone must not separate P from U)")
    reference_model: str | None = Field(
        None, description="a name under `models:` that cannot have been trained on P; the audit is re-run against it "
                          "and the verdict is inconclusive if it also finds P > U")
    alpha: float = Field(0.05, gt=0, lt=1, description="level of the controls, per audit and uncorrected (firing more is the safe side)")


class LabelsSpec(FrozenSpec):
    """How a class-conditional model gets each image's class (docs/PIPELINE.md, "Shard sources")."""

    map: dict[str, int] | str | None = Field(
        None, description="collection label → model class index, inline or the URI of a JSON object / CSV "
                          "(default: the model's class names, else the label read as an index)")
    missing: Literal["error", "null"] | None = Field(
        None, description="an image without a label: error (default) or null — the model's null/unconditional "
                          "class (default: the model's missing_label option)")

    @field_validator("map")
    @classmethod
    def _map(cls, v):
        return check_uri(v) if isinstance(v, str) else v


class AuditSpec(FrozenSpec):
    """One collection audited against one model."""

    id: str = Field(pattern=AUDIT_ID_PATTERN, description="unique, path-safe audit id")
    model: str = Field(description="a name under `models:`")
    published: Source
    unpublished: Source
    preset: Preset | None = Field(None, description="feature preset; defaults to the model's access")
    features: list[str] | None = Field(None, description="explicit feature list instead of the preset, e.g. [dl, pia]")
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-feature hyper-parameters, e.g. {ml: {timesteps: [0, 500]}}"
    )
    calibration: Literal["none", "reference"] = Field(
        "none", description="features the test sees: none — the audited model's; reference — the audited model's minus "
                            "the reference model's on the same image (reference-based calibration, which removes what "
                            "makes an image easy or hard for any model; needs controls.reference_model)")
    test: TestSpec = Field(default_factory=TestSpec)
    controls: ControlsSpec | None = Field(None, description="this audit's distribution-shift guards; default: the batch's `controls`")
    labels: LabelsSpec = Field(default_factory=LabelsSpec, description="class labels of class-conditional models")
    seed: int = Field(0, ge=0, le=INT64_MAX, description="root seed of every random draw of this audit (stored as int64)")

    @field_validator("published", "unpublished", mode="after")
    @classmethod
    def _sources(cls, v, info):
        return check_source(v, info.field_name)

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v):
        return check_no_credential_keys(v, "overrides")


class FdrSpec(FrozenSpec):
    """False-discovery-rate control across the whole batch of audits."""

    method: Literal["bh", "by", "bonferroni", "none"] = Field(
        "bh", description="bh: Benjamini–Hochberg; by: Benjamini–Yekutieli; bonferroni; none: per-audit alpha only"
    )
    q: float = Field(0.05, gt=0, lt=1, description="target false-discovery rate")


#: Validation context key: leave the feature-registry and test-procedure checks for later
#: (:meth:`Manifest.registry_problems`).
DEFER_REGISTRIES = "defer_registries"


class Manifest(FrozenSpec):
    """A batch of audits."""

    version: Literal[1] = 1
    models: dict[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)], ModelSpec] = Field(min_length=1)
    audits: list[AuditSpec] = Field(min_length=1)
    output: str = Field(min_length=1, description="folder or s3:// prefix for results")
    feature_store: str | None = Field(None, description="feature store location; default <output>/features")
    fdr: FdrSpec = Field(default_factory=FdrSpec)
    controls: ControlsSpec = Field(default_factory=ControlsSpec, description="distribution-shift guards of every audit (on by default)")

    @field_validator("output", "feature_store")
    @classmethod
    def _locations(cls, v):
        return v if v is None else check_uri(v)

    @model_validator(mode="after")
    def _cross_references(self, info: ValidationInfo) -> "Manifest":
        problems = value_problems(self.model_dump(mode="python"))  # what the writers cannot store or must not see
        if problems:
            raise ValueError("\n".join(problems))
        seen: dict[str, int] = {}
        for i, a in enumerate(self.audits):
            if a.id in seen:
                problems.append(
                    f"audits[{i}].id: duplicate audit id {a.id!r} (first at audits[{seen[a.id]}]) — give each audit a unique id"
                )
            else:
                seen[a.id] = i
            if a.model not in self.models:
                known = ", ".join(sorted(self.models))
                problems.append(
                    f"audits[{i}].model: unknown model {a.model!r} — use one of the names under `models:` ({known})"
                )
            if not (info.context or {}).get(DEFER_REGISTRIES):
                problems.extend(self._registry_problems(i, a))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def registry_problems(self) -> list[str]:
        """The checks against the feature registry and the test procedures (they import torch, SciPy
        and scikit-learn: seconds), for a manifest validated with ``context={DEFER_REGISTRIES: True}``
        — :func:`cdi_ray.spec.load_manifest` with ``registries=False``."""
        return [p for i, a in enumerate(self.audits) for p in self._registry_problems(i, a)]

    def _registry_problems(self, i: int, a: AuditSpec) -> list[str]:
        known = a.model in self.models
        return [*(self._feature_problems(i, a) + self._reference_problems(i, a) if known else []),
                *_test_problems(i, a.test)]

    def _feature_problems(self, i: int, a: AuditSpec) -> list[str]:
        """Check preset / features / overrides with the feature registry (imported lazily: torch)."""
        from pydantic import ValidationError as _VE

        try:
            cfg = self.feature_config(a)
        except _VE as exc:
            field = "features" if a.features and any("features" in e["loc"] for e in exc.errors()) else "overrides"
            return [f"audits[{i}].{field}: {_one_line(e['msg'])}" for e in exc.errors()]
        if cfg.needs_gradients and self.models[a.model].access == "gray-box":
            what = "preset 'white-box'" if not a.features else f"features {a.features}"
            return [
                f"audits[{i}].{'features' if a.features else 'preset'}: {what} needs gradients but model "
                f"{a.model!r} is gray-box — use preset: gray-box (or drop gm/no), or set the model's access: white-box"
            ]
        return []

    def _reference_problems(self, i: int, a: AuditSpec) -> list[str]:
        ref = self.controls_of(a).reference_model
        if ref is None:
            if a.calibration == "reference":
                return [f"audits[{i}].calibration: 'reference' needs a reference model — set "
                        f"controls.reference_model (for this audit or the batch) to a model that cannot have seen P"]
            return []
        where = f"audits[{i}].controls.reference_model" if a.controls is not None else "controls.reference_model"
        if ref not in self.models:
            known = ", ".join(sorted(self.models))
            return [f"{where}: unknown model {ref!r} — use one of the names under `models:` ({known})"]
        if ref == a.model:
            return [f"{where}: {ref!r} is the audited model of audits[{i}] — a reference must be a model that cannot "
                    f"have been trained on the published images"]
        if self.feature_config(a, ref).needs_gradients and self.models[ref].access == "gray-box":
            return [f"{where}: audits[{i}] uses gradient features but reference model {ref!r} is gray-box — give the "
                    f"reference white-box access, or use preset: gray-box for the audit"]
        return []

    # -- derived -------------------------------------------------------------------------------
    def preset_of(self, audit: AuditSpec) -> str:
        return audit.preset or self.models[audit.model].access

    def feature_config(self, audit: AuditSpec, model: str | None = None):
        """The audit's :class:`~cdi_ray.features.config.FeatureConfig` under ``model`` (default: the audited
        model; e.g. its reference model) — the one place an audit's features are configured.

        ``model`` changes only what loading the model changes (its weight dtype runs the features under
        autocast); the features, overrides and seed are the audit's. The device stays at its default: it
        does not change values, and each feature actor sets its own.

        Raises:
            pydantic.ValidationError: features or overrides the feature registry refuses.
        """
        from cdi_ray.features.config import FeatureConfig  # torch: imported when first needed

        spec = self.models[model or audit.model]
        kwargs: dict[str, Any] = {"features": tuple(audit.features) if audit.features else self.preset_of(audit),
                                  "overrides": audit.overrides, "seed": audit.seed}
        if spec.dtype != "float32":
            kwargs["autocast_dtype"] = spec.dtype
        return FeatureConfig(**kwargs)

    def controls_of(self, audit: AuditSpec) -> ControlsSpec:
        """The audit's own ``controls`` if given, else the batch's."""
        return audit.controls if audit.controls is not None else self.controls

    def store_uri(self, output: str | None = None) -> str:
        """Where features are kept: ``feature_store`` or ``<output>/features``."""
        if self.feature_store:
            return self.feature_store
        from cdi_ray.storage import join  # storage is Ray-free too

        return join(output or self.output, "features")

    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the validated manifest."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def _test_problems(i: int, test: TestSpec) -> list[str]:
    """Check the procedure name and its options against cdi_ray.stats (imported lazily)."""
    from cdi_ray.stats import PROCEDURES

    proc = PROCEDURES.get(test.procedure)
    if proc is None:
        return [f"audits[{i}].test.procedure: unknown procedure {test.procedure!r} — use one of {', '.join(sorted(PROCEDURES))}"]
    unknown = sorted(set(test.options) - set(proc.defaults))
    if unknown:
        valid = ", ".join(sorted(proc.defaults)) or "none"
        return [f"audits[{i}].test.options: unknown option(s) {unknown} for {test.procedure!r} — valid options: {valid}"]
    return []


def _one_line(msg: str) -> str:
    """A nested pydantic message on one line, without its documentation links."""
    msg = msg.removeprefix("Value error, ")
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and not ln.strip().startswith("For further information")]
    return " ".join(lines)


def json_schema() -> dict:
    """The manifest's JSON Schema (for editors and CI)."""
    return Manifest.model_json_schema()

