"""Background jobs: what a page or the CLI submits, lists and cancels (records in
:mod:`core.data.jobs`), the task table (:mod:`core.jobs.tasks`) and the worker loop
(:mod:`core.jobs.worker`)."""
from core.data.jobs import JobError, cancel, list_jobs, log_tail, submit  # noqa: F401
