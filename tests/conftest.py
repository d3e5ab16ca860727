"""Shared fixtures (zoo models exported once per session) and automatic `real` marking.

A test needs the third-party wheels (rapidocr-onnxruntime, nudenet) when it reaches
`fmcompress.evaluation.thirdparty.real_model`: directly, through a helper function of the tests,
through a fixture (or a fixture's fixture), or in a decorator argument. Such tests get the
`real` marker at collection, so `-m "not real"` never runs one by mistake.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import textwrap
from pathlib import Path

import pytest

# compile measures onnxruntime's peak in a fresh process per model (1-3 s each); the suite's
# many compiles skip it, and the tests of the measurement switch it back on (fmcompress/memprobe.py rule e)
os.environ.setdefault("FMCOMPRESS_MEASURE_MEMORY", "0")

TESTS = Path(__file__).resolve().parent
REAL_ENTRY = "real_model"  # fmcompress.evaluation.thirdparty.real_model


@functools.cache
def _direct_facts(func) -> tuple[bool, tuple]:
    """(mentions real_model, the functions of the tests folder it names) for one function."""
    code = getattr(func, "__code__", None)
    if code is None or not Path(code.co_filename).resolve().is_relative_to(TESTS):
        return False, ()
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))  # decorators included
    except (OSError, TypeError, SyntaxError):
        return False, ()
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    helpers = tuple(h for h in (func.__globals__.get(n) for n in sorted(names)) if inspect.isfunction(h))
    return REAL_ENTRY in names | attrs, helpers


def _reaches_real_model(func) -> bool:
    """`func` mentions real_model, or calls (transitively) a test helper that does."""
    seen, stack = set(), [inspect.unwrap(func)]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        mentions, helpers = _direct_facts(current)
        if mentions:
            return True
        stack.extend(inspect.unwrap(h) for h in helpers)
    return False


def _needs_real_models(item: pytest.Item) -> bool:
    function = getattr(item, "function", None)
    if function is not None and _reaches_real_model(function):
        return True
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for fixturedef in (info.name2fixturedefs.get(name, ()) if info else ()):
            if _reaches_real_model(fixturedef.func):
                return True
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("real") is None and _needs_real_models(item):
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def zoo_onnx(tmp_path_factory):
    """zoo_onnx(name, shape) -> path of the zoo model exported to ONNX (cached per session)."""
    cache: dict[tuple, Path] = {}
    folder = tmp_path_factory.mktemp("zoo")

    def export(name: str, shape: tuple[int, ...]) -> Path:
        key = (name, tuple(shape))
        if key not in cache:
            from fmcompress.frontend import export_model

            path = folder / f"{name}_{'x'.join(map(str, shape))}.onnx"
            export_model(name, tuple(shape), path)
            cache[key] = path
        return cache[key]

    return export


@pytest.fixture(scope="session")
def resnet18_224(zoo_onnx) -> Path:
    return zoo_onnx("resnet18", (1, 3, 224, 224))
