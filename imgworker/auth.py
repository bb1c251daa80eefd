"""Who may upload: API keys for the app's servers, single-use upload grants
for its users' browsers.

    key     imgwk_<43 base64url>           [auth] keys_file keeps its SHA-256
                                           with a name and scopes; the key
                                           itself is printed once, kept nowhere
    grant   imgwg_<payload>.<signature>    payload: base64url JSON
                                             {"o": owner, "m": max bytes,
                                              "e": expiry (unix s), "n": nonce,
                                              "s": signing secret's id}
                                           signature: HMAC-SHA256 of
                                             "imgwg_<payload>" with that secret
                                             ([auth] grant_secrets_file)
    used    ROOT/grants/<nonce>            made with O_EXCL by the upload a
                                           grant is spent on, on the storage
                                           every API host shares; dated at the
                                           grant's expiry for the sweep

A grant is checked from its own bytes (no lookup but the one "used" name), so
an app's backend can hand out as many as it likes. The prefixes let secret
scanners find a key pasted where it should not be.

Every refusal is decided from the request's headers, before any of its
body is read (nginx asks GET /auth/upload first, with auth_request).
"""

import base64
import binascii
import contextlib
import dataclasses
import datetime
import fcntl
import grp
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
import urllib.parse

logger = logging.getLogger(__name__)

KEY_PREFIX = "imgwk_"
GRANT_PREFIX = "imgwg_"
SCOPES = ("upload", "grant", "delete")

#: reason -> (HTTP status, what the client is told). The set is fixed: it is
#: the label set of imgworker_auth_refusals_total, and public contract.
REASONS = {
    "missing": (401, "credentials are needed: an API key, or for an upload an upload "
                     "grant, as 'Authorization: Bearer ...' (a grant also as ?grant=)"),
    "invalid": (401, "the credentials are not valid"),
    "expired": (401, "the upload grant has expired"),
    "used": (401, "the upload grant has been used already; ask for a new one"),
    "scope": (403, "these credentials may not do this"),
    "too_large": (413, "the upload is larger than its grant allows"),
    "length_required": (411, "an upload with a grant says its size: send a Content-Length "
                             "(not a chunked body)"),
}

#: Longer than any token imgworker makes: anything longer is refused
#: unparsed.
_MAX_TOKEN = 1024
_MAX_OWNER = 256
#: An owner written into a grant's signature is trusted later; one given
#: with a key is still checked the same way.
_OWNER_CHARACTERS = frozenset(map(chr, range(0x20, 0x7F))) - {"\\", '"'}


class Refusal(Exception):
    """A request the credentials do not allow; ``reason`` is a key of
    REASONS."""

    def __init__(self, reason, detail=None):
        status, message = REASONS[reason]
        super().__init__(detail or message)
        self.reason, self.status = reason, status


def check_owner(owner):
    """The owner as given, or ValueError: printable ASCII, 1-256 characters
    (an opaque id of the app's user, never shown to anyone but the app)."""
    if (not isinstance(owner, str) or not 0 < len(owner) <= _MAX_OWNER
            or not set(owner) <= _OWNER_CHARACTERS):
        raise ValueError(f"an owner is 1-{_MAX_OWNER} printable ASCII characters, "
                         "no quote or backslash")
    return owner


def rfc3339(unix):
    return datetime.datetime.fromtimestamp(int(unix), datetime.timezone.utc) \
        .strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _hash(key):
    return hashlib.sha256(key.encode()).hexdigest()


# -- files shared by the API processes and the command line -------------------

class _WatchedFile:
    """A small JSON file that running processes re-read when it changes: a
    stat() per use, a read only after a write replaced it (atomic renames
    give the file a new inode). Missing: ``empty``. Unreadable: ``empty``,
    logged once per change."""

    def __init__(self, path, empty):
        self.path, self._empty = path, empty
        self._seen, self._value = None, empty
        self._lock = threading.Lock()

    def current(self):
        try:
            stat = os.stat(self.path)
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen != self._seen:
                self._seen, self._value = seen, self._load() if seen else self._empty
            return self._value

    def _load(self):
        try:
            return _read_list(self.path)
        except (OSError, ValueError) as error:
            logger.error("Cannot read %s (%s): every credential it holds is refused until "
                         "it can be read.", self.path, error)
            return self._empty


def _read_list(path):
    """The JSON list in path ([] if there is no file); OSError or
    ValueError if it cannot be read or is not a list of objects. The
    command line reads this way before it writes, so a file it cannot read
    is never replaced by one that lost its entries."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except FileNotFoundError:
        return []
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise ValueError(f"{path} is not a JSON list of objects")
    return value


@contextlib.contextmanager
def _updating(path):
    """Around a read-modify-write of path by the command line: two
    `imgworker keys add` at once must not lose one of the keys. The lock is
    the directory's (flock), so no lock file is left beside the keys."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield _read_list(path)
    finally:
        os.close(fd)


def _write_private(path, value):
    """Replace path with value as JSON, atomically and durably, readable by
    root and the imgworker group alone (0640 root:imgworker when that group
    exists and we may give files to it; 0600 otherwise)."""
    directory = os.path.dirname(path)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        mode = 0o600
        try:
            os.fchown(fd, -1, grp.getgrnam("imgworker").gr_gid)
            mode = 0o640
        except (KeyError, PermissionError):
            pass
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, path)
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    scopes: tuple
    created: str


class KeyFile:
    """[auth] keys_file: [{"name", "scopes", "created", "sha256"}]."""

    def __init__(self, path):
        self._file = _WatchedFile(path, [])
        self._index = (None, {})

    @property
    def path(self):
        return self._file.path

    def find(self, key):
        """The Key whose secret ``key`` is, or None."""
        entries = self._file.current()
        if self._index[0] is not entries:
            self._index = (entries, {entry["sha256"]: Key(entry["name"], tuple(entry["scopes"]),
                                                          entry["created"])
                                     for entry in entries
                                     if {"sha256", "name", "scopes", "created"} <= set(entry)})
        return self._index[1].get(_hash(key))

    def list(self):
        return [Key(entry["name"], tuple(entry["scopes"]), entry["created"])
                for entry in self._file.current()]

    def add(self, name, scopes):
        """A new key: returns its secret, which is kept nowhere."""
        if not name or not set(name) <= _OWNER_CHARACTERS - {" "}:
            raise ValueError("a key's name is printable ASCII with no space, quote or backslash")
        unknown = set(scopes) - set(SCOPES)
        if unknown or not scopes:
            raise ValueError("scopes are one or more of " + ", ".join(SCOPES))
        with _updating(self.path) as entries:
            if any(entry.get("name") == name for entry in entries):
                raise ValueError(f"there is a key named {name!r} already; revoke it first")
            key = KEY_PREFIX + _b64(secrets.token_bytes(32))
            entries.append({"name": name, "scopes": [s for s in SCOPES if s in scopes],
                            "created": rfc3339(time.time()), "sha256": _hash(key)})
            _write_private(self.path, entries)
        return key

    def revoke(self, name):
        with _updating(self.path) as entries:
            kept = [entry for entry in entries if entry.get("name") != name]
            if len(kept) == len(entries):
                raise LookupError(f"no key named {name!r}")
            _write_private(self.path, kept)


class GrantSecrets:
    """[auth] grant_secrets_file: [{"id", "secret" (hex), "created",
    "retired"}], the newest signing. A rotated-out secret still verifies
    until every grant it signed has expired (max_grant_ttl after it was
    retired), so a rotation refuses no grant."""

    def __init__(self, path, max_ttl):
        self._file = _WatchedFile(path, [])
        self.max_ttl = max_ttl

    @property
    def path(self):
        return self._file.path

    def signing(self):
        """(id, secret bytes) new grants are signed with; LookupError when
        there is none yet."""
        for entry in reversed(self._file.current()):
            if entry.get("retired") is None:
                return entry["id"], bytes.fromhex(entry["secret"])
        raise LookupError(f"{self.path} holds no grant secret; run 'imgworker grant-secret "
                          "rotate'")

    def verifying(self, secret_id, now):
        for entry in self._file.current():
            if entry.get("id") == secret_id:
                retired = entry.get("retired")
                if retired is None or now < retired + self.max_ttl:
                    return bytes.fromhex(entry["secret"])
        return None

    def rotate(self, if_missing=False):
        """Sign new grants with a new secret; forget the retired ones no
        grant can still need. With ``if_missing``, only make the first."""
        with _updating(self.path) as entries:
            if if_missing and entries:
                return False
            now = time.time()
            kept = []
            for entry in entries:
                if entry.get("retired") is None:
                    entry["retired"] = now
                if now < entry["retired"] + self.max_ttl:
                    kept.append(entry)
            kept.append({"id": secrets.token_hex(4), "secret": secrets.token_hex(32),
                         "created": rfc3339(now), "retired": None})
            _write_private(self.path, kept)
        return True


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who a request comes from, once its credentials are checked."""
    kind: str                   # "key", "grant" or "anonymous"
    scopes: tuple
    owner: str = None           # a grant's; a key upload's ?owner=
    name: str = None            # the key's
    max_bytes: int = None       # a grant's
    nonce: str = None           # a grant's
    expires: int = None         # a grant's


def _token(environ):
    """The bearer token of a request: its Authorization header, else its
    ?grant= (a plain HTML form cannot set a header). None when neither."""
    header = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.strip().partition(" ")
    if header and scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if header:
        return ""               # some other scheme: not credentials we take
    grants = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("grant")
    if not grants:
        return None
    # Only a grant travels in the URL (and so into access logs): spent or
    # expired soon, it is worth little there; a key must not be.
    return grants[0] if grants[0].startswith(GRANT_PREFIX) else ""


class Gatekeeper:
    """Checks credentials against the keys file and the grant secrets, and
    spends grants. One per API process; the files are re-read when they
    change, so `imgworker keys revoke` takes effect in every process within
    a second."""

    def __init__(self, config):
        self.required = config.auth.required
        self.max_ttl = config.auth.max_grant_ttl
        self.max_upload_bytes = config.api.max_upload_bytes
        self.keys = KeyFile(config.auth.keys_file)
        self.secrets = GrantSecrets(config.auth.grant_secrets_file, self.max_ttl)
        self.used_dir = os.path.join(config.storage.root, "grants")

    # -- checking -----------------------------------------------------------------
    def admit(self, environ, scope, declared_length=None, owner=None):
        """The Caller of a request that may do ``scope``, or Refusal. Nothing
        but headers is looked at; ``declared_length`` is the body's
        Content-Length, checked against a grant's max_bytes; ``owner`` a
        key upload's ?owner=."""
        token = _token(environ)
        if token is None:
            # Without [auth] required, uploads need nothing; grants still do.
            # An anonymous upload names no owner: anyone could name anyone's.
            if self.required or scope != "upload":
                raise Refusal("missing")
            return Caller("anonymous", ("upload",))
        if token.startswith(GRANT_PREFIX):
            caller = self._grant(token)
        elif token.startswith(KEY_PREFIX) and len(token) <= _MAX_TOKEN:
            key = self.keys.find(token)
            if key is None:
                raise Refusal("invalid")
            caller = Caller("key", key.scopes, owner=owner, name=key.name)
        else:
            raise Refusal("invalid")
        if scope not in caller.scopes:
            raise Refusal("scope", f"these credentials may not {scope}")
        if caller.nonce is not None and os.path.exists(self._used_path(caller.nonce)):
            raise Refusal("used")
        if caller.max_bytes is not None and declared_length is None:
            # a chunked body would be read whole before its size is known
            raise Refusal("length_required")
        if caller.max_bytes is not None and declared_length > caller.max_bytes:
            raise Refusal("too_large", f"the upload is {declared_length} bytes; its grant "
                                       f"allows at most {caller.max_bytes}")
        return caller

    def _grant(self, token):
        payload, dot, signature = token[len(GRANT_PREFIX):].partition(".")
        if not dot or len(token) > _MAX_TOKEN:
            raise Refusal("invalid")
        try:
            encoded, given = _unb64(payload), _unb64(signature)
            # Only the one spelling imgworker makes: base64 has others for
            # the same bytes (the unused low bits of the last character),
            # and a token changed anywhere must be refused.
            if _b64(encoded) != payload or _b64(given) != signature:
                raise ValueError("not canonical base64url")
            claims = json.loads(encoded)
            secret_id, expires = claims["s"], int(claims["e"])
            owner, max_bytes, nonce = claims["o"], int(claims["m"]), claims["n"]
        except (ValueError, TypeError, KeyError, binascii.Error, RecursionError):
            raise Refusal("invalid") from None
        now = time.time()
        secret = self.secrets.verifying(secret_id, now) if isinstance(secret_id, str) else None
        expected = hmac.new(secret or b"", (GRANT_PREFIX + payload).encode(), "sha256").digest()
        if secret is None or not hmac.compare_digest(expected, given):
            raise Refusal("invalid")
        if not (isinstance(nonce, str) and nonce.isalnum() and isinstance(owner, str)):
            raise Refusal("invalid")
        if now >= expires:
            raise Refusal("expired")
        return Caller("grant", ("upload",), owner=owner, max_bytes=max_bytes, nonce=nonce,
                      expires=expires)

    # -- grants ---------------------------------------------------------------------
    def issue(self, owner, max_bytes=None, ttl=None):
        """A new grant: {"grant", "expires_at", "upload_url"}. ``ttl`` is cut
        to max_grant_ttl, ``max_bytes`` to [api] max_upload_bytes."""
        check_owner(owner)
        ttl = self.max_ttl if ttl is None else min(ttl, self.max_ttl)
        max_bytes = self.max_upload_bytes if max_bytes is None else min(max_bytes,
                                                                        self.max_upload_bytes)
        if ttl <= 0 or max_bytes <= 0:
            raise ValueError("ttl and max_bytes must be above 0")
        secret_id, secret = self.secrets.signing()
        expires = int(time.time() + ttl)
        payload = _b64(json.dumps({"o": owner, "m": max_bytes, "e": expires,
                                   "n": secrets.token_hex(16), "s": secret_id},
                                  separators=(",", ":")).encode())
        signature = _b64(hmac.new(secret, (GRANT_PREFIX + payload).encode(), "sha256").digest())
        token = f"{GRANT_PREFIX}{payload}.{signature}"
        return {"grant": token, "expires_at": rfc3339(expires),
                "upload_url": "/upload?grant=" + token}

    def _used_path(self, nonce):
        return os.path.join(self.used_dir, nonce)

    def spend(self, caller):
        """Mark a grant used, once across every process and host sharing the
        storage (O_EXCL on the storage): Refusal("used") for all but the
        first. The mark is made durable by the sync that makes the upload
        durable (storage.GroupSync syncs the whole filesystem), before the
        202. Nothing to do for a key."""
        if caller.nonce is None:
            return
        path = self._used_path(caller.nonce)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise Refusal("used") from None
        os.close(fd)
        # Dated at the grant's expiry: the sweep forgets it after that,
        # when the grant is refused as expired anyway.
        os.utime(path, (caller.expires, caller.expires))

    def unspend(self, caller):
        """The upload a grant was spent on was not accepted after all (the
        broker or the storage refused it): the grant is good again."""
        if caller.nonce is not None:
            try:
                os.unlink(self._used_path(caller.nonce))
            except FileNotFoundError:
                pass


def forget_spent_grants(root, now=None):
    """The sweep's part: remove the used-marks of grants that have expired
    (each is dated at its grant's expiry). Returns how many."""
    directory = os.path.join(root, "grants")
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return 0
    with entries:
        for entry in entries:
            try:
                if entry.stat().st_mtime < now - 60:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
    return removed
