"""Fault scenarios run against the same real services as tests/integration;
the run ends with the ledger's table, and for the cluster scenarios how long
uploads were refused and workers away."""

from harness.ledger import RESULTS, table


def pytest_terminal_summary(terminalreporter):
    if RESULTS:
        terminalreporter.section("fault scenarios: the ledger")
        terminalreporter.write_line(table(RESULTS))
    from tests.faults.test_cluster_faults import RECOVERIES
    if RECOVERIES:
        terminalreporter.section("cluster scenarios: seconds until ...")
        for scenario, event, seconds in RECOVERIES:
            terminalreporter.write_line(f"{scenario}: {event}: {seconds} s")
