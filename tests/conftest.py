"""Test-tree-wide pytest configuration: shared fixtures live in tests/support/."""

pytest_plugins = ["tests.support.conftest_plugin"]
