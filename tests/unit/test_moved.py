"""Module paths from before the 0.2 layout still import, warn, and are the new modules."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from maas_worker import _moved


@pytest.mark.parametrize(("old", "new"), sorted(_moved.MOVED.items()))
def test_old_path_is_the_new_module_with_a_warning(old: str, new: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_celery_config_strings_from_before_the_move_still_resolve() -> None:
    from celery.utils.imports import symbol_by_name

    from maas_worker.broker.scheduling import ReservedShareCycle
    from maas_worker.broker.transport import Transport

    sys.modules.pop("maas_worker.transport", None)
    sys.modules.pop("maas_worker.scheduling", None)
    with pytest.warns(DeprecationWarning):
        assert symbol_by_name("maas_worker.transport:Transport") is Transport
    with pytest.warns(DeprecationWarning):
        assert symbol_by_name("maas_worker.scheduling:ReservedShareCycle") is ReservedShareCycle


def test_old_names_on_the_client_and_monitoring_packages_forward() -> None:
    import maas_worker.client
    import maas_worker.monitoring
    from maas_worker.client import client
    from maas_worker.monitoring import samples

    with pytest.warns(DeprecationWarning, match=r"maas_worker\.client\.client\.log"):
        assert maas_worker.client.log is client.log
    with pytest.warns(DeprecationWarning, match=r"monitoring\.samples\.SampleStore"):
        assert maas_worker.monitoring.SampleStore is samples.SampleStore
    with pytest.raises(AttributeError):
        _ = maas_worker.monitoring.no_such_name


def test_the_new_paths_import_without_any_deprecation_warning() -> None:
    code = (
        "import importlib, warnings; warnings.simplefilter('error');"
        "from maas_worker import _moved;"
        "[importlib.import_module(m) for m in _moved.MOVED.values()];"
        "import maas_worker.app"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_a_submodule_does_not_go_through_the_old_names() -> None:
    code = (
        "import sys, warnings; warnings.simplefilter('error');"
        "from maas_worker.monitoring import autoscale;"
        "assert 'maas_worker.monitoring.samples' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
