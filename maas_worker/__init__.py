"""maas-worker: secure asynchronous model-inference jobs on Celery and Redis."""

from __future__ import annotations

from maas_worker import _moved
from maas_worker.client import AsyncClient, AsyncJob, Client, Job, as_completed
from maas_worker.errors import (
    ConfigError,
    InputTooLarge,
    InvalidEnvelope,
    JobCancelled,
    JobError,
    JobExpired,
    JobFailed,
    JobNotSucceeded,
    JobRejected,
    KeyringError,
    MaasError,
    ModelError,
    ModelRejected,
    PolicyDenied,
    QueueFull,
    RateLimited,
    ResultTimeout,
    ServiceUnavailable,
    SubmitError,
    UnknownJob,
    UnknownModel,
    UnknownTenant,
)
from maas_worker.protocol import JobInfo, JobState, Priority
from maas_worker.settings import Settings

__version__ = "0.1.0"

_moved.install()

__all__ = [
    # client
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Job",
    "JobInfo",
    "JobState",
    "Priority",
    "Settings",
    "as_completed",
    # errors
    "ConfigError",
    "InputTooLarge",
    "InvalidEnvelope",
    "JobCancelled",
    "JobError",
    "JobExpired",
    "JobFailed",
    "JobNotSucceeded",
    "JobRejected",
    "KeyringError",
    "MaasError",
    "ModelError",
    "ModelRejected",
    "PolicyDenied",
    "QueueFull",
    "RateLimited",
    "ResultTimeout",
    "ServiceUnavailable",
    "SubmitError",
    "UnknownJob",
    "UnknownModel",
    "UnknownTenant",
]
