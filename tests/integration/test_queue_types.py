"""[broker] queue_type and `imgworker migrate-queues`, on the real RabbitMQ:
a pipeline runs on quorum queues, and queued jobs and dead letters move
from one type to the other with every message kept."""

import subprocess
import sys
import urllib.parse

import pika

from harness import samples
from harness.pipeline import REPO


def queue_type(pipeline, name):
    """classic or quorum, as `rabbitmqctl list_queues` shows it."""
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(pipeline.amqp_url).path[1:]) or "/"
    listing = subprocess.run(["rabbitmqctl", "-s", "list_queues", "-p", vhost, "name", "type"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    return dict(line.split("\t") for line in listing.splitlines())[name]


def bodies(pipeline, name):
    """Every message body in the queue, left in place."""
    connection = pika.BlockingConnection(pika.URLParameters(pipeline.amqp_url))
    channel, found = connection.channel(), []
    while True:
        method, _properties, body = channel.basic_get(name)
        if method is None:
            break
        found.append(body)
    connection.close()        # unacked: back in the queue
    return sorted(found)


def migrate(pipeline, to):
    return subprocess.run([sys.executable, "-m", "imgworker", "--config", pipeline.config_path,
                           "migrate-queues", "--to", to], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_a_pipeline_on_quorum_queues_takes_uploads_and_dead_letters_failures(make_pipeline):
    pipeline = make_pipeline(broker={"queue_type": "quorum"})
    pipeline.start_api()
    pipeline.start_worker()
    good = pipeline.upload(samples.jpeg(400, 300)).json()["id"]
    bad = pipeline.upload(samples.truncated_jpeg()).json()["id"]
    assert pipeline.wait_job(good)["state"] == "done"
    assert pipeline.wait_job(bad)["state"] == "failed"
    assert queue_type(pipeline, pipeline.queue) == queue_type(pipeline, pipeline.dead_letter_queue) \
        == "quorum"
    assert pipeline.dead_letters() == [(bad, "rejected")]


def test_migrate_queues_moves_every_queued_job_and_dead_letter_to_quorum_and_back(make_pipeline):
    # Given a classic job queue holding 5 jobs and a message that is not
    # one, and no service running
    pipeline = make_pipeline()
    pipeline.start_api()
    ids = [pipeline.upload(samples.jpeg(200, 150)).json()["id"] for _ in range(5)]
    pipeline.services[0].kill_tree()
    pipeline.publish_raw(b"not a job")
    jobs_before = bodies(pipeline, pipeline.queue)
    assert len(jobs_before) == 6
    # When the queues are migrated to quorum
    result = migrate(pipeline, "quorum")
    # Then both are quorum and hold exactly the same messages
    assert result.returncode == 0, result.stderr
    assert f"{pipeline.queue}: quorum, 6 messages moved" in result.stdout
    assert queue_type(pipeline, pipeline.queue) == "quorum"
    assert queue_type(pipeline, pipeline.dead_letter_queue) == "quorum"
    assert bodies(pipeline, pipeline.queue) == jobs_before
    # And a worker configured for quorum finishes the jobs and dead-letters the junk
    with open(pipeline.config_path) as handle:
        text = handle.read().replace("[broker]\n", "[broker]\nqueue_type = quorum\n", 1)
    with open(pipeline.config_path, "w") as handle:
        handle.write(text)
    pipeline.start_api()
    pipeline.start_worker()
    assert [pipeline.wait_job(job_id)["state"] for job_id in ids] == ["done"] * 5
    assert [body for body, _reason in pipeline.dead_lettered()] == [b"not a job"]
    # And back to classic, the dead letter kept, once the services stopped
    for service in pipeline.services:
        service.kill_tree()
    result = migrate(pipeline, "classic")
    assert result.returncode == 0, result.stderr
    assert queue_type(pipeline, pipeline.dead_letter_queue) == "classic"
    assert bodies(pipeline, pipeline.dead_letter_queue) == [b"not a job"]
    # A second run has nothing left to do
    assert "0 messages moved" in migrate(pipeline, "classic").stdout


def test_a_migration_cut_short_after_the_move_aside_is_finished_by_the_next_run(make_pipeline):
    # Given what a run killed between its two moves leaves: the job queue
    # gone, its messages in <queue>.migrating (declared with the new type)
    pipeline = make_pipeline()
    from imgworker import broker, config
    settings = config.load(pipeline.config_path)
    jobs_arguments, _ = broker.queue_arguments(settings, "quorum")
    connection = pika.BlockingConnection(pika.URLParameters(pipeline.amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(pipeline.queue + ".migrating", durable=True, arguments=jobs_arguments)
    for i in range(3):
        channel.basic_publish("", pipeline.queue + ".migrating", b"job %d" % i,
                              pika.BasicProperties(delivery_mode=2))
    connection.close()
    # When migrate-queues runs again
    result = migrate(pipeline, "quorum")
    # Then the queue exists with the new type, holding all three, and the temp queue is gone
    assert result.returncode == 0, result.stderr
    assert queue_type(pipeline, pipeline.queue) == "quorum"
    assert bodies(pipeline, pipeline.queue) == [b"job 0", b"job 1", b"job 2"]
    vhost_queues = subprocess.run(["rabbitmqctl", "-s", "list_queues", "name"], capture_output=True,
                                  text=True, timeout=120, check=True).stdout.split()
    assert pipeline.queue + ".migrating" not in vhost_queues
