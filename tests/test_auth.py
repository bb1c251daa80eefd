"""Keys, grants and their files (imgworker/auth.py), without a server: what
a key or a grant lets through, and what each refusal says. Through nginx
and the API: tests/integration/test_auth.py."""

import base64
import json
import os
import stat
import threading
import time

import pytest

from imgworker import auth, config


@pytest.fixture
def settings(tmp_path):
    return config.from_dict({
        "storage": {"root": str(tmp_path / "storage")},
        "auth": {"keys_file": str(tmp_path / "keys.json"),
                 "grant_secrets_file": str(tmp_path / "grant-secrets.json")},
    })


@pytest.fixture
def gate(settings):
    os.makedirs(os.path.join(settings.storage.root, "grants"))
    auth.GrantSecrets(settings.auth.grant_secrets_file, 900).rotate()
    return auth.Gatekeeper(settings)


def bearer(token):
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def refusal(gate, environ, scope="upload", length=None):
    with pytest.raises(auth.Refusal) as refused:
        gate.admit(environ, scope, length)
    return refused.value.status, refused.value.reason


def test_a_fresh_config_requires_credentials_and_says_so_with_the_reason_missing(gate):
    assert gate.required
    assert refusal(gate, {}) == (401, "missing")


def test_a_key_is_shown_once_kept_only_as_a_hash_in_a_private_file_and_admits_its_scopes(gate):
    key = gate.keys.add("app", ["upload", "grant"])
    assert key.startswith("imgwk_") and len(key) == len("imgwk_") + 43
    with open(gate.keys.path) as handle:
        stored = handle.read()
    assert key not in stored and key[6:] not in stored
    assert stat.S_IMODE(os.stat(gate.keys.path).st_mode) in (0o600, 0o640)
    caller = gate.admit(bearer(key), "upload")
    assert (caller.kind, caller.name) == ("key", "app")
    assert gate.admit(bearer(key), "grant").name == "app"
    assert refusal(gate, bearer(key), "delete") == (403, "scope")
    assert [(k.name, k.scopes) for k in gate.keys.list()] == [("app", ("upload", "grant"))]


def test_wrong_keys_and_other_schemes_are_all_just_invalid(gate):
    key = gate.keys.add("app", ["upload"])
    for environ in (bearer(key[:-1] + ("A" if key[-1] != "A" else "B")),
                    bearer("imgwk_" + "x" * 2000), bearer("hello"),
                    {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"a:b").decode()},
                    {"QUERY_STRING": "grant=" + key}):      # a key never in a URL
        assert refusal(gate, environ) == (401, "invalid")


def test_a_revoked_key_is_refused_by_a_gatekeeper_already_running(gate):
    kept, revoked = gate.keys.add("kept", ["upload"]), gate.keys.add("gone", ["upload"])
    assert gate.admit(bearer(revoked), "upload").name == "gone"
    gate.keys.revoke("gone")
    assert refusal(gate, bearer(revoked)) == (401, "invalid")
    assert gate.admit(bearer(kept), "upload").name == "kept"
    with pytest.raises(LookupError):
        gate.keys.revoke("gone")


def test_a_keys_file_that_cannot_be_read_is_never_overwritten_by_the_command_line(gate):
    with open(gate.keys.path, "w") as handle:
        handle.write("{not json")
    with pytest.raises(ValueError):
        gate.keys.add("app", ["upload"])
    with open(gate.keys.path) as handle:
        assert handle.read() == "{not json"
    assert refusal(gate, bearer("imgwk_" + "A" * 43)) == (401, "invalid")


def test_a_grant_carries_its_owner_and_size_and_is_good_until_it_expires(gate):
    issued = gate.issue("user-7", max_bytes=1000, ttl=60)
    token = issued["grant"]
    assert token.startswith("imgwg_") and issued["upload_url"] == "/upload?grant=" + token
    assert issued["expires_at"].endswith("Z")
    for environ in (bearer(token), {"QUERY_STRING": "grant=" + token}):
        caller = gate.admit(environ, "upload", 1000)
        assert (caller.kind, caller.owner, caller.max_bytes) == ("grant", "user-7", 1000)
    assert refusal(gate, bearer(token), "upload", 1001) == (413, "too_large")
    assert refusal(gate, bearer(token), "grant") == (403, "scope")
    assert refusal(gate, bearer(token), "upload") == (411, "length_required")   # chunked
    # ttl and max_bytes are capped, not refused
    capped = gate.admit(bearer(gate.issue("u", max_bytes=10 ** 12, ttl=10 ** 6)["grant"]), "upload", 1)
    assert capped.max_bytes == gate.max_upload_bytes
    assert capped.expires <= time.time() + 900


def test_an_expired_grant_is_refused_as_expired(gate, monkeypatch):
    token = gate.issue("u", ttl=5)["grant"]
    later = time.time() + 6
    monkeypatch.setattr(auth.time, "time", lambda: later)
    assert refusal(gate, bearer(token)) == (401, "expired")


def test_every_changed_byte_of_a_grant_makes_it_invalid(gate):
    token = gate.issue("u", ttl=60)["grant"]
    body = token[len("imgwg_"):]
    for position in range(len(body)):
        flipped = body[:position] + ("A" if body[position] != "A" else "B") + body[position + 1:]
        status, reason = refusal(gate, bearer("imgwg_" + flipped))
        assert (status, reason) == (401, "invalid"), position
    # a grant re-signed by someone without the secret: an owner of their choosing
    payload, signature = body.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["o"] = "someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert refusal(gate, bearer(f"imgwg_{forged}.{signature}")) == (401, "invalid")


def test_a_grant_is_spent_once_whatever_the_race_and_given_back_if_not_accepted(gate):
    token = gate.issue("u", ttl=60)["grant"]
    callers = [gate.admit(bearer(token), "upload", 100) for _ in range(16)]
    won, barrier = [], threading.Barrier(len(callers))

    def spend(caller):
        barrier.wait()
        try:
            gate.spend(caller)
            won.append(caller)
        except auth.Refusal as refused:
            assert refused.reason == "used"
    threads = [threading.Thread(target=spend, args=(caller,)) for caller in callers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert refusal(gate, bearer(token)) == (401, "used")
    gate.unspend(won[0])                # its upload was refused after all
    assert gate.admit(bearer(token), "upload", 100).owner == "u"


def test_the_sweep_forgets_spent_grants_only_once_they_have_expired(gate, settings):
    short, long = (gate.admit(bearer(gate.issue("u", ttl=ttl)["grant"]), "upload", 100)
                   for ttl in (5, 600))
    gate.spend(short)
    gate.spend(long)
    assert auth.forget_spent_grants(settings.storage.root) == 0
    assert auth.forget_spent_grants(settings.storage.root, now=time.time() + 70) == 1
    assert os.listdir(gate.used_dir) == [long.nonce]


def test_rotating_the_secret_refuses_no_grant_signed_before_until_it_expires(gate, monkeypatch):
    before = gate.issue("u", ttl=900)["grant"]
    gate.secrets.rotate()
    after = gate.issue("u", ttl=900)["grant"]
    assert gate.admit(bearer(before), "upload", 100).owner == "u"
    assert gate.admit(bearer(after), "upload", 100).owner == "u"
    # a second rotation within the lifetime keeps both older secrets
    gate.secrets.rotate()
    assert gate.admit(bearer(before), "upload", 100).owner == "u"
    # once every grant they signed has expired, the two retired ones are
    # forgotten; the one this rotation retires is kept for its grants
    with open(gate.secrets.path) as handle:
        retired = {entry["id"] for entry in json.load(handle)[:2]}
    later = time.time() + 901
    monkeypatch.setattr(auth.time, "time", lambda: later)
    gate.secrets.rotate()
    with open(gate.secrets.path) as handle:
        kept = [entry["id"] for entry in json.load(handle)]
    assert len(kept) == 2 and not retired & set(kept)


def test_without_required_an_upload_needs_nothing_but_credentials_given_are_still_checked(tmp_path):
    settings = config.from_dict({"storage": {"root": str(tmp_path)},
                                 "auth": {"required": "false",
                                          "keys_file": str(tmp_path / "keys.json"),
                                          "grant_secrets_file": str(tmp_path / "g.json")}})
    gate = auth.Gatekeeper(settings)
    assert gate.admit({}, "upload", owner="o").owner is None     # anyone could say "o"
    assert refusal(gate, {}, "grant") == (401, "missing")
    assert refusal(gate, bearer("imgwk_wrong")) == (401, "invalid")


@pytest.mark.parametrize("owner", ["", "x" * 257, "tab\there", "quote\"", "ø", None, 7])
def test_an_owner_is_printable_ascii_of_bounded_length(gate, owner):
    with pytest.raises(ValueError):
        gate.issue(owner)


def test_the_config_takes_origins_and_refuses_what_is_not_one():
    parsed = config.from_dict({"auth": {"cors_origins": "https://App.example, http://localhost:3000"}})
    assert parsed.auth.cors_origins == ("https://app.example", "http://localhost:3000")
    for bad in ("https://app.example/", "app.example", "*", "ftp://x"):
        with pytest.raises(config.ConfigError):
            config.from_dict({"auth": {"cors_origins": bad}})


def test_keys_added_at_the_same_time_are_all_kept(gate):
    barrier = threading.Barrier(8)

    def add(number):
        barrier.wait()
        gate.keys.add(f"app{number}", ["upload"])
    threads = [threading.Thread(target=add, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(key.name for key in gate.keys.list()) == [f"app{n}" for n in range(8)]
