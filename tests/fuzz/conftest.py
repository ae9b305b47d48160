"""The long fuzz runs only when asked for by marker: ``python -m pytest -m slow tests/fuzz``.

Slow tests elsewhere run by default (pyproject.toml); the long fuzz runs (thousands of examples,
minutes) would dominate the default run, so they also carry ``fuzz_long`` and are skipped unless the
``-m`` expression names ``slow``.
"""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz_long: many-example fuzz run; runs only with -m slow")


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long fuzz run: select it with -m slow")
    for item in items:
        if "fuzz_long" in item.keywords:
            item.add_marker(skip)
