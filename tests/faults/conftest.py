"""Fault scenarios run against the same real services as tests/integration;
the run ends with the ledger's table."""

from harness.ledger import RESULTS, table


def pytest_terminal_summary(terminalreporter):
    if RESULTS:
        terminalreporter.section("fault scenarios: the ledger")
        terminalreporter.write_line(table(RESULTS))
