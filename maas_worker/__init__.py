"""maas-worker: secure asynchronous model-inference jobs on Celery and Redis."""

from __future__ import annotations

from .client import Client
from .errors import (
    ConfigError,
    InputTooLarge,
    InvalidEnvelope,
    JobCancelled,
    JobError,
    JobExpired,
    JobFailed,
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
from .job import Job
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    # client
    "Client",
    "Job",
    "Settings",
    # errors
    "ConfigError",
    "InputTooLarge",
    "InvalidEnvelope",
    "JobCancelled",
    "JobError",
    "JobExpired",
    "JobFailed",
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
