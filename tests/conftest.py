"""Fixtures for every test folder; the harness behind them is harness/pipeline.py.

Without a broker the tests that need one skip on a laptop, and FAIL under
CI=true: a CI that forgot to start RabbitMQ must not go green.
"""

import os

import pika
import pytest

from harness.pipeline import AMQP_URL, Pipeline


@pytest.fixture(scope="session")
def amqp_url():
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except Exception as error:  # noqa: BLE001 - any failure means "no broker"
        message = f"RabbitMQ is not reachable at {AMQP_URL}: {error!r}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must start it: see .ci/run)")
        pytest.skip(message)
    return AMQP_URL


@pytest.fixture
def make_pipeline(amqp_url, tmp_path):
    """Pipelines with their own config, storage and queues; every process
    they started is killed and their queues deleted afterwards."""
    made = []

    def make(**sections):
        workdir = tmp_path / f"pipeline{len(made)}"
        workdir.mkdir()
        made.append(Pipeline(amqp_url, workdir, **sections))
        return made[-1]
    yield make
    for pipeline in made:
        pipeline.close()


@pytest.fixture
def pipeline(make_pipeline):
    return make_pipeline()
