"""The public Python surface: `maas_worker.__all__` and the error hierarchy."""

from __future__ import annotations

import inspect

import pytest

import maas_worker
from maas_worker import errors

#: Documented as worker-side only ("EnvelopeRejected: the same, carrying the audit
#: reason"); callers catch it as its exported base, InvalidEnvelope.
INTERNAL_ERRORS = {"EnvelopeRejected"}


def _error_classes() -> dict[str, type[BaseException]]:
    return {
        name: obj
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    }


def test_every_name_in_all_exists() -> None:
    assert len(maas_worker.__all__) == len(set(maas_worker.__all__))
    for name in maas_worker.__all__:
        assert hasattr(maas_worker, name), name


def test_all_lists_the_documented_api() -> None:
    assert {"Client", "Job", "Settings"} <= set(maas_worker.__all__)


def test_every_public_error_is_exported() -> None:
    public = {n for n in _error_classes() if not n.startswith("_")} - INTERNAL_ERRORS
    missing = public - set(maas_worker.__all__)
    assert not missing
    for name in public:
        assert getattr(maas_worker, name) is getattr(errors, name)


def test_internal_errors_are_caught_as_an_exported_base() -> None:
    for name in INTERNAL_ERRORS:
        cls = getattr(errors, name)
        exported = [
            base
            for base in cls.__mro__[1:]
            if base.__name__ in maas_worker.__all__ and base is not errors.MaasError
        ]
        assert exported, name


def test_exported_names_are_public_objects() -> None:
    for name in maas_worker.__all__:
        assert not name.startswith("_")
        obj = getattr(maas_worker, name)
        assert obj.__module__.startswith("maas_worker."), name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from maas_worker import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(maas_worker.__all__)


def test_every_error_derives_from_maas_error() -> None:
    classes = _error_classes()
    assert "MaasError" in classes
    for name, cls in classes.items():
        assert issubclass(cls, errors.MaasError), name
        assert issubclass(cls, Exception), name


def test_every_error_is_in_the_module_docstring_tree() -> None:
    doc = errors.__doc__ or ""
    for name in _error_classes():
        assert name in doc, name


def test_every_error_has_a_docstring() -> None:
    for name, cls in _error_classes().items():
        assert cls.__doc__, name


def test_result_timeout_is_also_a_timeout_error() -> None:
    assert issubclass(maas_worker.ResultTimeout, TimeoutError)
    assert issubclass(maas_worker.ResultTimeout, maas_worker.MaasError)
    with pytest.raises(TimeoutError):
        raise maas_worker.ResultTimeout("job j: no result within 1 s")


def test_hierarchy() -> None:
    e = maas_worker
    assert issubclass(e.UnknownTenant, e.KeyringError)
    assert issubclass(errors.EnvelopeRejected, e.InvalidEnvelope)
    for cls in (e.UnknownModel, e.PolicyDenied, e.InputTooLarge):
        assert issubclass(cls, e.SubmitError)
    for cls in (e.JobRejected, e.JobFailed, e.UnknownJob):
        assert issubclass(cls, e.JobError)


def test_invalid_envelope_is_opaque() -> None:
    assert str(maas_worker.InvalidEnvelope()) == "invalid envelope"
    rejected = errors.EnvelopeRejected("tampered", {"tenant": "acme"}, authenticated=True)
    assert str(rejected) == "invalid envelope"
    assert "tampered" not in repr(rejected)
    assert rejected.reason == "tampered"
    assert rejected.authenticated is True


def test_job_errors_carry_the_job_id() -> None:
    err = maas_worker.JobFailed("j1", "model_error", "bad input shape")
    assert err.job_id == "j1"
    assert err.reason == "model_error"
    assert "j1" in str(err)
    assert maas_worker.JobRejected("j2", "rejected").job_id == "j2"


def test_version() -> None:
    assert isinstance(maas_worker.__version__, str)
