"""``/v1/jobs``: submit, list, read and cancel search jobs, and download the best trial's weights."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse

from service import jobs
from service.api.body import JSONBodyRoute
from service.api.deps import JobDep, PrincipalDep, SessionDep, SettingsDep, StorageDep
from service.api.errors import PROBLEM_RESPONSES, ProblemError, problem_doc
from service.schemas import BestTrial, JobCreate, JobPage, JobPublic, JobState, Progress
from service.tables import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=JSONBodyRoute, responses=PROBLEM_RESPONSES)

BEST_MODEL_FILE = "best-model.pt"

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Makes a retried submission return the same job (printable ASCII, 1 to 255 characters)",
    ),
]


def job_public(job: Job) -> JobPublic:
    """A stored job as the API shows it."""
    return JobPublic(
        id=job.id,
        name=job.name,
        state=JobState(job.state),
        spec=JobCreate.model_validate(job.spec),
        progress=Progress.model_validate(job.progress),
        best_trial=None if job.best_trial is None else BestTrial.model_validate(job.best_trial),
        failure_reason=job.failure_reason,
        study_name=job.study_name,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    summary="Submit a search job",
    responses={
        422: PROBLEM_RESPONSES[422] | {"description": "Invalid spec, or Idempotency-Key reused"},
        429: problem_doc("This API key has too many unfinished jobs"),
    },
)
def submit_job(
    spec: JobCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    storage: StorageDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Store the job (QUEUED) with its Optuna study; 202 with ``Location``.

    The same ``Idempotency-Key`` with the same spec returns the same job (202 again); with a different spec
    it is a 422 problem naming the header (the IETF Idempotency-Key draft's answer to a reused key). A spec
    this deployment cannot run (``app.state.spec_checks``: its limits, the cluster's size) is a 422 too. A
    key with ``max_active_jobs_per_key`` unfinished jobs gets a 429 until one of them ends.
    """
    if not principal.admin:
        unfinished = jobs.count_unfinished(session, principal.key_id)
        if unfinished >= settings.max_active_jobs_per_key:
            raise ProblemError(
                429,
                f"this API key has {unfinished} unfinished jobs, the most allowed at once "
                "(ESGD_MAX_ACTIVE_JOBS_PER_KEY); submit again when one has ended",
                slug="too-many-active-jobs",
            )
    job, _created = jobs.create_job(
        session,
        storage,
        spec,
        idempotency_key=idempotency_key,
        request_hash=jobs.spec_hash(spec),
        owner=principal.key_id,
        checks=request.app.state.spec_checks,
    )
    response.headers["Location"] = request.url_for("get_job", job_id=job.id).path
    return job_public(job)


@router.get("", response_model=JobPage, summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state")] = None,
    page_size: Annotated[int, Query(ge=1, le=jobs.MAX_PAGE_SIZE)] = 20,
    page_token: Annotated[str | None, Query(description="next_page_token of the previous page")] = None,
) -> JobPage:
    """An admin key (or anyone while keys are off) sees every job; another key its own."""
    owner = None if principal.admin else principal.key_id
    rows, token = jobs.list_jobs(
        session, state=state, owner=owner, page_size=page_size, page_token=page_token or None
    )
    return JobPage(items=[job_public(job) for job in rows], next_page_token=token)


@router.get("/{job_id}", response_model=JobPublic, summary="Read a job")
def get_job(job: JobDep) -> JobPublic:
    return job_public(job)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic, summary="Cancel a job")
def cancel_job(job: JobDep, session: SessionDep) -> JobPublic:
    """A queued job is cancelled at once; a running one goes to CANCELLING until its driver has stopped.

    Cancelling a finished job is a 409 problem.
    """
    return job_public(jobs.request_cancel(session, job))


@router.get(
    "/{job_id}/best-model",
    response_class=FileResponse,
    summary="Download the best trial's trained weights",
    responses={200: {"content": {"application/octet-stream": {}}, "description": "A torch state dict"}},
)
def best_model(job: JobDep, settings: SettingsDep) -> FileResponse:
    """The weights file the job's driver saved; 404 until there is one.

    The path is built from the stored job id (checked against its pattern), never from request text.
    """
    if jobs.JOB_ID_PATTERN.fullmatch(job.id) is None:
        raise ProblemError(404, f"job {job.id} has no best model", slug="best-model-not-found")
    path = settings.artifacts_dir / job.id / BEST_MODEL_FILE
    if not path.is_file():
        raise ProblemError(404, f"job {job.id} has no best model yet", slug="best-model-not-found")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{job.id}-{BEST_MODEL_FILE}")
