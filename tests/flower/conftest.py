"""What the Flower tests share: the task identity a ClientApp process has, and the comparison of
two runs' records within the stated tolerance (docs/flower.md).

Usage::

    def test_x(tmp_path, task_identity): ...          # makes Messages in this process
    assert_close(records_a, records_b, "records")     # nested dicts, lists and floats
"""

from __future__ import annotations

import math

import pytest

REL = 1e-5  # the stated tolerance (docs/flower.md)


@pytest.fixture
def task_identity():
    """What a ClientApp process has set before it makes Messages (restored after)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def assert_close(a, b, where: str) -> None:
    """``a`` and ``b`` equal, floats within :data:`REL` relative (NaN equals NaN)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, str):
        same = math.isclose(a, b, rel_tol=REL, abs_tol=1e-9)
        assert same or (math.isnan(a) and math.isnan(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)
