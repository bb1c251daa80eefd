"""Fault scenarios run against the same real services as tests/integration."""

from tests.faults.ledger import RESULTS, table
from tests.integration.conftest import amqp_url, make_pipeline  # noqa: F401 - fixtures


def pytest_terminal_summary(terminalreporter):
    if RESULTS:
        terminalreporter.section("fault scenarios: the ledger")
        terminalreporter.write_line(table(RESULTS))
