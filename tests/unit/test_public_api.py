"""``__all__`` lists exactly the public names of the package root."""

from __future__ import annotations

import inspect

import celery_exclusive


def test_all_equals_the_public_names() -> None:
    public = {
        name
        for name, value in vars(celery_exclusive).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert set(celery_exclusive.__all__) == public | {"__version__"}


def test_every_public_name_has_a_docstring() -> None:
    for name in celery_exclusive.__all__:
        value = getattr(celery_exclusive, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), name


def test_every_error_derives_from_the_root() -> None:
    for name in celery_exclusive.__all__:
        value = getattr(celery_exclusive, name)
        if inspect.isclass(value) and issubclass(value, Exception):
            assert issubclass(value, celery_exclusive.ExclusiveError), name


def test_every_error_survives_pickle_and_rebuild_from_its_message() -> None:
    import pickle

    from celery_exclusive import AlreadyRunning, LeaseLost, StaleFence, Timeout

    for error in (
        AlreadyRunning("busy", key="k", holder={"task_id": "t"}),
        LeaseLost("lost", key="k"),
        Timeout("slow", key="k", timeout=1.5),
        StaleFence(resource="k", fence=7, current=8),
    ):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
        assert again.key == "k"
        rebuilt = type(error)(*error.args)  # how Celery's result backend rebuilds errors
        assert str(rebuilt) == str(error)
