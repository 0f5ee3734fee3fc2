"""Stage 6 — aggregate: every planned run on the aggregator actors, then the controls per audit.

Each audit's own run and its control runs (:class:`~cdi_ray.pipeline.plan.Role`) become
:class:`~cdi_ray.pipeline.aggregator.AuditTask` s, grouped by store partition; the groups go to
a pool of aggregator actors (:mod:`cdi_ray.pipeline.aggregator`: the test, the model-free control,
the report payload), the largest first. Back here, a reference run's result becomes its audit's
reference-model control (:func:`cdi_ray.controls.reference_control`); a run that could not be
made (its model, its stream, its features) makes that control fire.

A small batch (:data:`DRIVER_AGGREGATION_IMAGES` images in all its runs) is aggregated in the
driver instead, by the same :class:`~cdi_ray.pipeline.aggregator.AuditAggregator`: the driver has
the statistics loaded already, and an actor's start-up and imports would cost more than the tests.

The default procedure's permutation cap is raised so that the batch's multiple-testing control
can resolve its smallest threshold (:func:`batch_max_permutations`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from cdi_ray.pipeline import cluster
from cdi_ray.pipeline.aggregator import AuditAggregator, AuditOutcome, AuditTask
from cdi_ray.pipeline.compute import FeatureCounts
from cdi_ray.pipeline.plan import AuditPlan, AuditRun, BatchPlan, Role

#: Aggregator actors at most; each holds one store partition's needed rows at a time.
MAX_AGGREGATORS = 4
#: One more aggregator per this many audits (a test takes ~10 ms on small sets; an actor's
#: start-up and imports take seconds).
AUDITS_PER_AGGREGATOR = 64
#: Batches whose runs hold at most this many images in all are aggregated in the driver (their
#: feature matrices are a few MB at most: 10,000 × 26 floats).
DRIVER_AGGREGATION_IMAGES = 10_000
#: Upper bound of the permutation cap raised for a batch's FDR control (see batch_max_permutations):
#: 200,000 resolves BH at q = 0.05 over 5,000 audits; a permutation of a 20k+20k audit costs ~1 ms,
#: and only audits with overwhelming evidence run to the cap (the others stop after h exceedances).
MAX_BATCH_PERMUTATIONS = 200_000
#: The default procedure's own cap (cdi_ray.stats, ridge scorer).
DEFAULT_MAX_PERMUTATIONS = 9_999


@dataclass(frozen=True)
class AuditOutcomes:
    """Stage 6's record: one outcome per audit (controls attached), and the permutation cap used."""

    outcomes: dict[str, AuditOutcome]
    max_permutations: int | None


def batch_max_permutations(m: int, q: float, method: str) -> int | None:
    """The permutation cap an audit needs so that the batch's multiple-testing control can reject it.

    With m tested audits, Benjamini–Hochberg (and Bonferroni) compare the smallest p-value with
    q/m; Benjamini–Yekutieli with q/(m·Σ_{i≤m} 1/i). A Monte Carlo permutation p-value cannot go
    below 1/(B+1), so B must reach the reciprocal of that threshold; twice that leaves room for a
    few exceedances. Never below the procedure's default (9,999), never above
    :data:`MAX_BATCH_PERMUTATIONS`; ``None`` for ``method="none"`` (per-audit α: default cap).
    """
    if method == "none" or m <= 0:
        return None
    threshold = q / m
    if method == "by":
        threshold /= sum(1.0 / i for i in range(1, m + 1))
    need = 2 * math.ceil(1.0 / threshold)
    return int(min(MAX_BATCH_PERMUTATIONS, max(DEFAULT_MAX_PERMUTATIONS, need)))


def test_options(test, cap: int | None) -> dict:
    """An audit's procedure options, with the batch's permutation cap filled in where the audit
    left ``max_permutations`` unset, for procedures whose permutations are closed-form (the
    default's directional and ridge scorers; the logistic scorer refits per permutation, so its cap
    stays the user's choice)."""
    from cdi_ray.stats import closed_form_permutations

    options = dict(test.options)
    if cap is not None and "max_permutations" not in options and closed_form_permutations(test.procedure, options):
        options["max_permutations"] = cap
    return options


test_options.__test__ = False  # not a pytest test


def _runs(plan: BatchPlan) -> list[AuditRun]:
    return [r for a in plan.audits.values() for r in (a.main, a.reference) if r is not None]


def in_driver(plan: BatchPlan) -> bool:
    """Whether the batch is small enough to aggregate in the driver."""
    return sum(r.images for r in _runs(plan)) <= DRIVER_AGGREGATION_IMAGES


def _aggregators(n: int) -> list:
    """``n`` aggregator actors from the driver's pool (kept across runs: each imports the statistics stack once)."""
    return cluster.actor_pool(AuditAggregator, n, num_cpus=1, max_restarts=1, max_task_retries=1)


def start_aggregators(plan: BatchPlan, max_aggregators: int = MAX_AGGREGATORS) -> None:
    """Start the aggregator actors now and let them import the statistics stack, so that their
    start-up overlaps the feature computation instead of following it (not for a batch
    aggregated in the driver)."""
    runs = [a.main for a in plan.audits.values() if a.main is not None]
    if runs and not in_driver(plan):
        groups = len({(r.fingerprint, r.feature_key) for r in runs})
        for actor in _aggregators(min(max_aggregators, groups, -(-len(runs) // AUDITS_PER_AGGREGATOR))):
            actor.warm_up.remote()


def _task(audit, plan: AuditPlan, run: AuditRun, manifest, options: dict, standing=None) -> AuditTask:
    """The aggregator's task for one run of ``audit``."""
    from cdi_ray.controls.model_free import control_seed
    from cdi_ray.controls.reference import REFERENCE_MODEL

    if run.role is Role.REFERENCE:  # the same test on the reference model's features, its own seed, no controls
        return AuditTask(audit.id, run.role, run.published, run.unpublished, audit.test.procedure, audit.test.alpha,
                         control_seed(audit.seed, REFERENCE_MODEL), dict(audit.test.options))
    ctl = manifest.controls_of(audit)
    calibrated = audit.calibration == "reference"
    return AuditTask(audit.id, run.role, run.published, run.unpublished, audit.test.procedure, audit.test.alpha,
                     audit.seed, options, controls={"model_free": {"alpha": ctl.alpha}} if ctl.model_free else {},
                     descriptor_key=plan.descriptor_key,
                     calibration=(plan.reference.fingerprint, plan.reference.feature_key) if calibrated else None,
                     calibration_sets=(plan.reference.published, plan.reference.unpublished) if calibrated else None,
                     standing=replace(standing, fingerprint=run.fingerprint, feature_key=run.feature_key)
                     if standing is not None else None)


@dataclass(frozen=True)
class AuditTasks:
    """Every run the aggregate stage will make, grouped by store partition (model fingerprint, config key).

    Built on the driver from the plan (per audit, never per image); callers that keep evidence of
    each test (the requests job) read the same groups that the aggregators ran."""

    groups: dict[tuple[str, str], list[AuditTask]]
    columns: dict[tuple[str, str], list[str]]
    failed: dict[str, str]  # audit id → why it cannot be tested at all
    max_permutations: int | None


def audit_tasks(plan: BatchPlan, manifest, features: FeatureCounts, standing: dict | None = None) -> AuditTasks:
    """Each audit's own run and its reference run as aggregator tasks, with the batch's permutation cap;
    ``standing`` (audit id → :class:`~cdi_ray.pipeline.standing.StandingAudit`) makes those audits take
    their nightly look."""
    failed: dict[str, str] = {}
    for a in manifest.audits:
        ap = plan.audits[a.id]
        failed_stream = ap.main and features.failed_fingerprints.get(ap.main.fingerprint)
        if ap.error or failed_stream:
            failed[a.id] = ap.error or failed_stream
    cap = batch_max_permutations(len(manifest.audits) - len(failed), manifest.fdr.q, manifest.fdr.method)
    groups: dict[tuple[str, str], list[AuditTask]] = {}
    columns: dict[tuple[str, str], list[str]] = {}
    for a in manifest.audits:
        ap = plan.audits[a.id]
        if a.id in failed:
            continue
        runs = [ap.main] + ([ap.reference] if ap.reference and ap.reference.fingerprint not in features.failed_fingerprints else [])
        for run in runs:
            group = (run.fingerprint, run.feature_key)
            groups.setdefault(group, []).append(_task(a, ap, run, manifest, test_options(a.test, cap),
                                                      (standing or {}).get(a.id)))
            columns[group] = list(run.columns)
    return AuditTasks(groups, columns, failed, cap)


def aggregate(plan: BatchPlan, manifest, features: FeatureCounts, store_root: str, *,
              max_aggregators: int = MAX_AGGREGATORS, standing: dict | None = None) -> AuditOutcomes:
    """Run every audit's runs (see the module docstring and :func:`audit_tasks`)."""
    import ray

    from cdi_ray.controls.reference import reference_control

    tasks = audit_tasks(plan, manifest, features, standing)
    groups, columns, failed, cap = tasks.groups, tasks.columns, tasks.failed, tasks.max_permutations
    outcomes: dict[tuple[str, Role], AuditOutcome] = {}
    if groups and in_driver(plan):
        for (fp, key), tasks in groups.items():
            for o in AuditAggregator().run_tasks(store_root, fp, key, columns[(fp, key)], tasks, plan.transient_dir):
                outcomes[(o.audit_id, o.role)] = o
    elif groups:
        n_tasks = sum(len(t) for t in groups.values())
        actors = _aggregators(min(max_aggregators, len(groups), -(-n_tasks // AUDITS_PER_AGGREGATOR)))
        order = sorted(groups, key=lambda g: -len(groups[g]))
        pending = {actors[i % len(actors)].run_tasks.remote(store_root, fp, key, columns[(fp, key)], groups[(fp, key)],
                                                            plan.transient_dir): (fp, key)
                   for i, (fp, key) in enumerate(order)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(ready[0])
            try:
                for o in ray.get(ready[0]):
                    outcomes[(o.audit_id, o.role)] = o
            except Exception as exc:  # noqa: BLE001 — the group's audits fail, the others go on
                cluster.drop_actor_pool(AuditAggregator)  # do not reuse a pool that lost an actor
                for t in groups[group]:
                    outcomes[(t.audit_id, t.role)] = AuditOutcome(t.audit_id, "failed", role=t.role,
                                                                  error=f"aggregator failed: {cluster.one_line(exc)}")
    out: dict[str, AuditOutcome] = {}
    for a in manifest.audits:
        o = outcomes.get((a.id, Role.AUDIT)) or AuditOutcome(a.id, "failed", error=failed.get(a.id, "not run"))
        ap, ref = plan.audits[a.id], manifest.controls_of(a).reference_model
        if ref and o.status == "done":
            shadow = outcomes.get((a.id, Role.REFERENCE))
            ok = shadow is not None and shadow.status == "done"
            error = (ap.reference_error or (ap.reference and features.failed_fingerprints.get(ap.reference.fingerprint))
                     or (shadow.error if shadow is not None else "not run"))
            o.controls.append(reference_control(shadow.result if ok else None, reference=ref,
                                                alpha=manifest.controls_of(a).alpha, error=None if ok else error))
        out[a.id] = o
    return AuditOutcomes(out, cap)
