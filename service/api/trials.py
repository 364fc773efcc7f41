"""``/v1/jobs/{id}/trials``: a job's trials by number, each with its state, reason and learning curve."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from service import jobs, studies
from service.api.deps import JobDep, StorageDep
from service.api.errors import PROBLEM_RESPONSES, ProblemError
from service.schemas import TrialPage, TrialPublic

router = APIRouter(prefix="/v1/jobs/{job_id}/trials", tags=["trials"], responses=PROBLEM_RESPONSES)


@router.get("", response_model=TrialPage, summary="List a job's trials by number")
def list_trials(
    job: JobDep,
    storage: StorageDep,
    page_size: Annotated[int, Query(ge=1, le=jobs.MAX_PAGE_SIZE)] = 20,
    page_token: Annotated[str | None, Query(description="next_page_token of the previous page")] = None,
) -> TrialPage:
    """Trials in ascending number; the token is opaque like the jobs list's."""
    after = jobs.decode_page_token(page_token, {"job": job.id}) if page_token else -1
    remaining = [t for t in studies.trials(storage, job.study_name) if t.number > after]
    page = remaining[:page_size]
    token = jobs.encode_page_token(page[-1].number, {"job": job.id}) if len(remaining) > page_size else ""
    return TrialPage(items=[studies.trial_public(t) for t in page], next_page_token=token)


@router.get("/{number}", response_model=TrialPublic, summary="Read one trial with its learning curve")
def get_trial(
    job: JobDep, storage: StorageDep, number: Annotated[int, Path(ge=0, le=2**31 - 1)]
) -> TrialPublic:
    try:
        return studies.trial_public(studies.trial(storage, job.study_name, number))
    except KeyError:
        raise ProblemError(404, f"job {job.id} has no trial {number}", slug="trial-not-found") from None
