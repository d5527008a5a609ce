"""Triton kernels on CPU tensors for tests: Triton's interpreter.

``triton`` reads ``TRITON_INTERPRET`` when it is imported (its library functions, such as
``tl.randint4x``, are ``@triton.jit`` functions made then) and ``@triton.jit`` reads it again when
each kernel is defined; torch imports ``triton`` on its own, early. ``tests/conftest.py`` therefore
sets the variable before any test runs (on a machine without CUDA); the ``triton_interpreter``
fixture checks that it took effect, and skips where it is not set (a CUDA machine, whose
``cuda``-marked tests run the kernels on the device). ``kernels`` runs a test once with the torch
path and once with the Triton one::

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
def triton_interpreter():
    """Kernels launched on CPU tensors in this test run in Triton's interpreter; skipped without
    ``triton`` or without ``TRITON_INTERPRET=1`` (tests/conftest.py). numpy's warnings about inf
    and NaN inside the interpreter (the kernels pass them through on purpose) are silenced."""
    from pfc.head.kernels import triton_interpreted

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]')")
    if not triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 from the start (tests/conftest.py "
                    "sets it where CUDA is absent)")
    if _compiled_triton_loaded():
        pytest.fail("triton was imported in this process before TRITON_INTERPRET=1 was set "
                    "(tests/conftest.py sets it before any test module is imported)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
        yield


@pytest.fixture(params=["torch", "triton"])
def kernels(request):
    """The row kernels' implementation a test runs with: ``"torch"``, then ``"triton"`` (interpreted)."""
    if request.param == "triton":
        request.getfixturevalue("triton_interpreter")
    return request.param
