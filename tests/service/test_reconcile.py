"""The reconciler's sweep of studies whose submission died before its job was stored, on both backends."""

from __future__ import annotations

import sys
import time

from service import jobs, studies
from service.dispatch import DriverSettings, RayDispatcher
from service.reconcile import Reconciler
from service.schemas import JobCreate

GRACE_S = 0.3


def reconciler_for(backend, database, study_storage) -> Reconciler:
    """A reconciler whose dispatcher is never reached: the sweep only reads and deletes studies."""
    settings = backend.settings.model_copy(update={"orphan_study_grace_s": GRACE_S})
    driver = DriverSettings(sys.executable, "sqlite://", settings.artifacts_dir, settings.data_dir)
    return Reconciler(settings, database.session, study_storage, RayDispatcher("http://127.0.0.1:1", driver))


def test_a_study_left_without_its_job_is_deleted_after_the_grace_and_others_are_kept(
    backend, database, study_storage
):
    reconciler = reconciler_for(backend, database, study_storage)
    spec = JobCreate(name="kept", baselines=["sgd"])
    with database.session() as session:
        job, _ = jobs.create_job(session, study_storage, spec)
    half_made = "job-0123456789ab/half-made"  # created as a submission would, its job never stored
    studies.create_study_for_job(study_storage, half_made, spec, job_id="job-0123456789ab")
    foreign = "someone-elses-study"  # not named like a job's: never the service's to delete
    study_storage.create_new_study(studies.study_directions(spec), foreign)

    with database.session() as session:
        assert (
            reconciler.sweep_orphan_studies(session) == []
        )  # at first sight it may be a submission in flight
        time.sleep(GRACE_S + 0.1)
        deleted = reconciler.sweep_orphan_studies(session)
    assert sorted(deleted) == [half_made, studies.baseline_study_name(half_made, "sgd")]
    remaining = {summary.study_name for summary in study_storage.get_all_studies()}
    assert remaining == {job.study_name, studies.baseline_study_name(job.study_name, "sgd"), foreign}
