"""Triton kernels on CPU tensors for tests: Triton's interpreter, switched on per test.

``triton`` reads ``TRITON_INTERPRET`` when it is imported (its own library functions, such as
``tl.randint4x``, are ``@triton.jit`` functions made at that moment) and ``@triton.jit`` reads it
again when each kernel is defined; pfc imports ``triton`` and its kernels only when a kernel is
first launched. So the variable must be set before the first launch in the process, which the
``triton_interpreter`` fixture does (and checks); every test that launches a Triton kernel on the
CPU uses it. ``kernels`` runs a test once with the torch path and once with the Triton one::

    from tests.triton_interpret import kernels, triton_interpreter  # noqa: F401  (fixtures)

    def test_something(kernels):      # "torch", then "triton" under the interpreter
"""
from __future__ import annotations

import importlib.util
import sys
import warnings

import pytest


def _compiled_triton_loaded() -> bool:
    """Whether ``triton`` was imported in this process without the interpreter (its library
    functions are then compiled-mode and every interpreted launch fails)."""
    random = sys.modules.get("triton.language.random")
    return random is not None and type(random.randint4x).__name__ != "InterpretedFunction"


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Set ``TRITON_INTERPRET=1`` for this test (kernels launched on CPU tensors run in Triton's
    interpreter); skipped without ``triton``. numpy's warnings about inf and NaN inside the
    interpreter (the kernels pass them through on purpose) are silenced."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]')")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _compiled_triton_loaded():
        pytest.fail("triton was imported in this process before TRITON_INTERPRET=1 was set: "
                    "a test launched a Triton kernel on the CPU without the triton_interpreter fixture")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
        yield


@pytest.fixture(params=["torch", "triton"])
def kernels(request):
    """The row kernels' implementation a test runs with: ``"torch"``, then ``"triton"`` (interpreted)."""
    if request.param == "triton":
        request.getfixturevalue("triton_interpreter")
    return request.param
