"""POST /v1/estimates: how long a spec will take and what it will cost, before it runs (service/common/estimate.py).

The same body as POST /v1/jobs, validated and checked the same way (a spec this service would refuse is a
422 here too); nothing is created or launched. Submission makes the same estimate (`estimate_for`),
refuses a spec whose estimate exceeds limits.max_hours or limits.max_cost, and stores it with the job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body

from service.api import history, policy
from service.api.deps import PrincipalDep, RunnerDep, SettingsDep, StoreDep
from service.api.errors import ApiError
from service.api.openapi import COMMON_ERRORS
from service.api.schemas import SUBMIT_EXAMPLES, resolve_body
from service.common.estimate import Estimate, check_limits, estimate
from service.common.settings import Settings
from service.engine.store import Store
from trainer.spec import JobSpec

router = APIRouter(tags=["estimates"], responses=COMMON_ERRORS)


def estimate_for(spec: JobSpec, store: Store, job_dir: Callable[[str], str], settings: Settings) -> Estimate:
    """The estimate of a validated spec from this service's history and settings, its limit checks filled in."""
    est = estimate(spec, history.collect(store, job_dir), pricing=settings.pricing)
    checks, _ = check_limits(spec, est, priced=bool(settings.pricing.prices))
    return est.model_copy(update={"checks": checks})


def refuse_over_limits(est: Estimate) -> None:
    """422 naming limits.max_hours / limits.max_cost and the estimate, when a check refuses the spec."""
    problems = [{"field": c.field, "message": c.message} for c in est.checks if c.refuses]
    if problems:
        shown = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise ApiError(422, "invalid_spec", f"{len(problems)} invalid field(s): {shown}", problems)


@router.post("/estimates", response_model=Estimate)
def make_estimate(
    body: Annotated[dict[str, Any], Body(openapi_examples=SUBMIT_EXAMPLES)],
    principal: PrincipalDep,
    store: StoreDep,
    runner: RunnerDep,
    settings: SettingsDep,
) -> Estimate:
    """The estimate for a spec as POST /v1/jobs would validate it: node type and count, images/s, start-up,
    per-epoch and wall time, GPU/CPU hours, cost (where TRAINCTL_PRICES is set), each with its basis
    (history of finished jobs with the same key, a bench/RESULTS.md figure, or "unknown"), and the spec's
    limits checked against it (`checks`; `refuses`: a submission would be refused). Launches nothing."""
    spec = resolve_body(body)
    policy.check_spec(spec, settings)
    return estimate_for(spec, store, runner.job_dir, settings)
