"""Fixtures for every test folder; the harness behind them is tests/harness.py."""

from tests.harness import amqp_url, make_pipeline, pipeline  # noqa: F401 - fixtures
