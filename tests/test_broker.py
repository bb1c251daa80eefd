"""broker.py without a broker: the job message, built and read in one place."""

import pytest

from imgworker import broker

JOB_ID = "0123456789abcdef0123456789abcdef"


def test_a_job_message_names_its_job():
    assert broker.job_id_of(broker.job_message(JOB_ID, "jpeg")) == JOB_ID


@pytest.mark.parametrize("body", [
    b"",
    b"not json",
    b"[" * 100000,                          # json.loads: RecursionError
    b'{"id": ' * 100000,
    b"1" * 5000,                            # json.loads: too many digits
    b"\xff\xfe\xfd",                        # not UTF-8 (nor 16, nor 32)
    b'{"id": "\xe9"}',
    b"[]", b"42", b"null", b'"' + JOB_ID.encode() + b'"',      # JSON, not an object
    b'{"format": "jpeg"}',
    b'{"id": 42}',
    b'{"id": ["' + JOB_ID.encode() + b'"]}',
    b'{"id": "' + JOB_ID.upper().encode() + b'"}',
    b'{"id": "' + JOB_ID.encode() + b'\\n"}',
    b'{"id": "../../etc/passwd"}',
], ids=lambda body: repr(body[:24]))
def test_any_other_body_names_no_job_and_never_raises(body):
    assert broker.job_id_of(body) is None
