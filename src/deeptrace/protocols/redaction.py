"""Secrets never leave the host: one place that knows what a secret looks like on the wire.

Every span the agent makes passes through `redact_span_parts` (spans.make_span): its payload
heads and its attributes, whatever the protocol parser put there. The lists below are the
whole policy, and the README lists them for users:

- header names (HTTP/1 and HTTP/2): those in SECRET_HEADERS, and any whose name has a word
  from SECRET_WORDS (`X-Auth-Token`, `X-Vault-Token`, `Proxy-Authorization`);
- query and form keys (the request target, `url.query`, a urlencoded or JSON body in a head):
  the same words (`password`, `api_key`, `access_token`, `client_secret`, ...);
- Redis commands: AUTH, HELLO, MIGRATE (everything after the command), ACL SETUSER (the rules
  after the user), CONFIG SET / SENTINEL SET of a parameter named with a secret word;
- SQL text (`db.query.text`, PostgreSQL and MySQL heads): the literal after PASSWORD,
  IDENTIFIED BY, SECRET; a PostgreSQL password message whole;
- AMQP: the SASL response of Connection.Start-Ok / Secure-Ok and the secret of Update-Secret
  (the head is cut where they start); application headers of a content header under a secret
  name; a message body's JSON and form pairs as in HTTP;
- MongoDB: the head is cut at the first BSON key (at any depth) that is a secret name or one of
  MONGODB_SECRET_KEYS (SCRAM payloads, nonces, the handshake's speculative authentication);
  a compressed message after its OP_COMPRESSED header (snappy keeps literals as they were).

Kafka's credentials are told apart by connection state, not by a head's bytes (a response does
not say which API it answers; SASL tokens after SaslHandshake v0 have no header), so its parser
cuts those heads itself.

A value is replaced by `[REDACTED]`; a head that ends inside a secret is cut there.
"""

from __future__ import annotations

import re
from functools import lru_cache

REDACTED = "[REDACTED]"
_R = REDACTED.encode()
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
                            "x-amz-security-token", "x-goog-api-key"})  # fmt: skip
# Words of a name (split at '-', '_', '.', and between camelCase words) that mark its value as a secret.
SECRET_WORDS = frozenset({"auth", "authorization", "cookie", "token", "secret", "password", "passwd", "pwd", "pass",
                          "apikey", "key", "passphrase", "credential", "credentials", "signature", "sig", "jwt",
                          "session", "sessionid", "jsessionid", "phpsessid", "otp"})  # fmt: skip
SECRET_KEYS = frozenset({"api_key", "api-key", "access_key", "private_key", "client_secret", "x-amz-credential"})
REDIS_ALL_ARGS = frozenset({"AUTH", "HELLO", "MIGRATE"})

# Cheap tests before any work: nearly every head has none of these words. Searched in the
# lowered bytes: a case-insensitive regex (?i) took six times as long, ~9 us per head, the most
# of any step in turning an HTTP record into a span.
_WORDS = (b"auth", b"cookie", b"token", b"secret", b"pass", b"pwd", b"key", b"sig", b"credential", b"jwt", b"sess",
          b"otp")  # fmt: skip
_MAYBE = re.compile(b"|".join(_WORDS))
_REDIS_MAYBE = re.compile(rb"auth|hello|migrate|setuser|pass|secret|token")
_SQL_MAYBE = re.compile(rb"password|identified|secret")
_MONGODB_MAYBE = re.compile(b"|".join((*_WORDS, b"payload", b"nonce", b"digest")))


def _mentions(head: bytes, words: re.Pattern) -> bool:
    return words.search(head.lower()) is not None
_WORD_SPLIT = re.compile(r"[-_.\s]+")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")


@lru_cache(maxsize=1 << 12)
def secret_name(name: str) -> bool:
    """Cached: every span's header names and parameter keys are checked, and they repeat."""
    words = _CAMEL.sub(r"\1_\2", name.strip()).lower()
    name = name.strip().lower()
    return name in SECRET_HEADERS or name in SECRET_KEYS or any(w in SECRET_WORDS for w in _WORD_SPLIT.split(words))


# --- HTTP: header lines, the request target's query, a form or JSON body ---

_HEADER_LINE = re.compile(rb"^([!#$%&'*+.^_`|~0-9A-Za-z:-]+)[ \t]*:")
# A key starts the text or follows a separator: tried only there, so a long run without
# separators costs one pass, not one per character.
_QUERY_PAIR = re.compile(rb"(?:^|(?<=[?&;\s]))([^&=?#;\s]+)=([^&#;\s]*)")
_JSON_PAIR = re.compile(rb'"([^"\\]{1,64})"\s*:\s*("(?:[^"\\]|\\.)*"?|[^,}\s{\[]+)')
_JSON_NESTED = re.compile(rb'"([^"\\]{1,64})"\s*:\s*[{\[]')
_MULTIPART = re.compile(rb'(?i)(name="([^"]{1,64})"[^\r\n]*\r?\n(?:[^\r\n]+\r?\n)*\r?\n)([^\r\n]*)')


def _query(text: bytes) -> bytes:
    return _QUERY_PAIR.sub(lambda m: m.group(1) + b"=" + _R if secret_name(m.group(1).decode("latin-1")) else m.group(0),
                           text)  # fmt: skip


def _json_value(m: re.Match) -> bytes:
    return b'"' + m.group(1) + b'": "' + _R + b'"' if secret_name(m.group(1).decode("latin-1")) else m.group(0)


def _json(body: bytes) -> bytes:
    # An object or array under a secret key: the head is cut there (its end is not sought).
    for m in _JSON_NESTED.finditer(body):
        if secret_name(m.group(1).decode("latin-1")):
            body = body[: m.start()] + b'"' + m.group(1) + b'": "' + _R + b'"'
            break
    return _JSON_PAIR.sub(_json_value, body)


def _body(body: bytes) -> bytes:
    """A body's start, whatever its framing (chunked, multipart): JSON pairs, form pairs and
    multipart fields under a secret name."""
    if b'"' in body:
        body = _json(body)
        body = _MULTIPART.sub(lambda m: m.group(1) + _R if secret_name(m.group(2).decode("latin-1")) else m.group(0),
                              body)  # fmt: skip
    return _query(body) if b"=" in body else body


def http_head(head: bytes) -> bytes:
    """An HTTP/1 message's head, or an HTTP/2 one's decoded `name: value` lines."""
    if not _mentions(head, _MAYBE):
        return head
    header_end = head.find(b"\r\n\r\n")
    sep_len = 4
    if header_end < 0:
        header_end, sep_len = head.find(b"\n\n"), 2
    headers, body = (head, b"") if header_end < 0 else (head[:header_end], head[header_end + sep_len :])
    lines = headers.split(b"\n")
    secret_value = False  # a folded line continues the header before it
    for i, line in enumerate(lines):
        if i == 0 and not _HEADER_LINE.match(line):  # the request or status line
            lines[i] = _query(line)
            continue
        if line[:1] in (b" ", b"\t"):
            if secret_value:
                lines[i] = line[:1] + _R + (b"\r" if line.endswith(b"\r") else b"")
            continue
        m = _HEADER_LINE.match(line)
        if m is None:
            secret_value = False
            continue
        name = m.group(1).decode("latin-1")
        if name.startswith(":") and name != ":":  # HTTP/2 pseudo-headers: ":path: /x?token=1"
            secret_value = False
            if name == ":path":
                lines[i] = _query(line)
            continue
        secret_value = secret_name(name)
        if secret_value:
            lines[i] = line[: m.end()] + b" " + _R + (b"\r" if line.endswith(b"\r") else b"")
    out = b"\n".join(lines)
    return out if header_end < 0 else out + head[header_end : header_end + sep_len] + _body(body)


# --- Redis ---

def _redis_args(head: bytes) -> list[tuple[int, int]]:
    """Where each argument's bytes lie in a request head (RESP or inline), as far as captured."""
    spans = []
    if head[:1] == b"*":
        pos = head.find(b"\r\n") + 2
        while 0 < pos < len(head) and head[pos : pos + 1] == b"$":
            eol = head.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                n = int(head[pos + 1 : eol])
            except ValueError:
                break
            start = eol + 2
            if n < 0:  # a null bulk: no bytes, and the next argument follows at once
                spans.append((start, start))
                pos = start
                continue
            spans.append((start, min(start + n, len(head))))
            pos = start + n + 2
        return spans
    line_end = head.find(b"\r\n")
    line_end = len(head) if line_end < 0 else line_end
    return [(m.start(), m.end()) for m in re.finditer(rb"\S+", head[:line_end])]


def _redis_secret_args(args: list[bytes]) -> list[int]:
    command = args[0].upper()
    if command.decode("latin-1") in REDIS_ALL_ARGS:
        return list(range(1, len(args)))
    sub = args[1].upper() if len(args) > 1 else b""
    if command == b"ACL" and sub == b"SETUSER":
        return list(range(3, len(args)))
    if (command == b"CONFIG" and sub == b"SET") or (command == b"SENTINEL" and sub in (b"SET", b"CONFIG")):
        # Name-value pairs; a parameter named with a secret word ("masterauth", "auth-pass",
        # "requirepass") hides its value.
        return [i + 1 for i in range(2, len(args)) if _secret_param(args[i])]
    return []


def _secret_param(name: bytes) -> bool:
    low = name.decode("latin-1").lower()
    return secret_name(low) or any(w in low for w in ("pass", "auth", "secret", "token"))


def redis_head(head: bytes) -> bytes:
    if not _mentions(head, _REDIS_MAYBE):
        return head
    where = _redis_args(head)
    if not where:
        return head
    args = [head[a:b] for a, b in where]
    secret = set(_redis_secret_args(args))
    if not secret:
        return head
    out, last = [], 0
    for i, (a, b) in enumerate(where):
        if i in secret:
            out += [head[last:a], _R]
            last = b
    out.append(head[last:])
    return b"".join(out)


# --- SQL text ---

_SQL_SECRET = re.compile(
    r"(?i)\b(PASSWORD|IDENTIFIED\s+(?:WITH\s+\S+\s+)?BY|SECRET)(\s*(?:=\s*)?(?:PASSWORD\s*)?\(?\s*)"
    r"([EU]&?'(?:[^'\\]|''|\\.)*'?|'(?:[^'\\]|''|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|(\$\w*\$).*?(?:\4|$))",
    re.DOTALL,
)


def sql_text(text: str) -> str:
    return _SQL_SECRET.sub(lambda m: m.group(1) + m.group(2) + "'" + REDACTED + "'", text)


def sql_head(head: bytes) -> bytes:
    """A MySQL or PostgreSQL message: the SQL in it with its password literals hidden."""
    if not _mentions(head, _SQL_MAYBE):
        return head
    return sql_text(head.decode("latin-1")).encode("latin-1")  # latin-1 keeps every byte as it was


def postgres_head(head: bytes) -> bytes:
    if head[:1] == b"p":  # PasswordMessage, or a SASL response: nothing in it is for anyone to read
        return head[:5] + _R
    return sql_head(head)


# --- AMQP 0-9-1: frames of type, channel, size, payload, end octet ---

_AMQP_VALUE_SIZE = {"t": 1, "b": 1, "B": 1, "s": 2, "u": 2, "I": 4, "i": 4, "f": 4, "l": 8, "L": 8, "d": 8, "D": 5,
                    "T": 8, "V": 0}  # fmt: skip
_AMQP_PREFIXED = "SxAF"  # long string, byte array, array, table: a 4-byte length first


def _amqp_secret_header(head: bytes, pos: int) -> int | None:
    """Where the value of the first application header with a secret name starts, in the
    `headers` table at pos of a content header frame (or where the table stops being readable)."""
    end = min(len(head), pos + 4 + int.from_bytes(head[pos : pos + 4], "big"))
    pos += 4
    while pos < end:
        key_end = pos + 1 + head[pos]
        if key_end >= end:
            return None  # the rest is past the head
        kind = chr(head[key_end])
        if secret_name(head[pos + 1 : key_end].decode("latin-1")):
            return key_end
        pos = key_end + 1
        if kind in _AMQP_PREFIXED:
            pos += 4 + int.from_bytes(head[pos : pos + 4], "big")
        elif kind in _AMQP_VALUE_SIZE:
            pos += _AMQP_VALUE_SIZE[kind]
        else:
            return key_end  # a type we cannot step over: what follows is unknown
    return None


def amqp_head(head: bytes) -> bytes:
    """A method frame's head, and the content header and body frames that follow it."""
    ids = head[7:11] if len(head) >= 11 and head[0] == 1 else b""
    if ids == b"\x00\x0a\x00\x0b":  # Connection.Start-Ok: client properties table, mechanism, response
        pos = 15 + int.from_bytes(head[11:15], "big")
        pos = pos + 1 + head[pos] if pos < len(head) else len(head) + 1
        # Where the response starts is known inside the head; else only the ids are kept (a head
        # cut inside the table holds no secret, but a table length that lies could hide one).
        return head[:pos] + _R if pos <= len(head) else head[:15] + _R
    if ids in (b"\x00\x0a\x00\x15", b"\x00\x0a\x00\x46"):  # Secure-Ok, Update-Secret
        return head[:11] + _R
    if not _mentions(head, _MAYBE):
        return head
    pos = 8 + int.from_bytes(head[3:7], "big")  # the frame after the method frame
    if head[pos : pos + 1] != b"\x02" or len(head) < pos + 21:
        return head
    flags = head[pos + 19] << 8 | head[pos + 20]
    body = pos + 8 + int.from_bytes(head[pos + 3 : pos + 7], "big")
    props = pos + 21
    for bit in (0x8000, 0x4000):  # content-type and content-encoding, short strings, come first
        if flags & bit and props < len(head):
            props += 1 + head[props]
    cut = _amqp_secret_header(head, props) if flags & 0x2000 and props < len(head) else None
    if cut is not None:
        return head[:cut] + _R
    return head[:body] + _body(head[body:]) if body < len(head) else head


# --- MongoDB: BSON elements are a type byte, a NUL-ended key, a value ---

MONGODB_SECRET_KEYS = frozenset({"payload", "nonce", "digest", "speculativeauthenticate"})
_BSON_KEY = re.compile(rb"[\x01-\x13\x7f\xff]([^\x00]{1,64})\x00")
_OP_COMPRESSED = (2012).to_bytes(4, "little")


def mongodb_head(head: bytes) -> bytes:
    if head[12:16] == _OP_COMPRESSED:
        return head[:25] + _R if len(head) > 25 else head
    if not _mentions(head[16:], _MONGODB_MAYBE):
        return head
    # Any byte run shaped like an element is tried: a false match only cuts the head sooner.
    for m in _BSON_KEY.finditer(head, 16):
        name = m.group(1).decode("latin-1")
        if name.lower() in MONGODB_SECRET_KEYS or secret_name(name):
            return head[: m.end()] + _R
    return head


# --- a span's parts ---

_HEADS = {"http": http_head, "http2": http_head, "redis": redis_head, "postgresql": postgres_head, "mysql": sql_head,
          "amqp": amqp_head, "mongodb": mongodb_head}  # fmt: skip


def redact_span_parts(protocol: str, attributes: dict, req_head: bytes, resp_head: bytes) -> tuple[bytes, bytes]:
    """Redacts attributes in place; returns the heads, redacted."""
    for key in [k for k in attributes if k in ("url.query", "db.query.text") or k.startswith("http.")]:
        value = attributes[key]
        if not isinstance(value, str):
            continue
        if key == "url.query":
            attributes[key] = _query(value.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
        elif key == "db.query.text":
            attributes[key] = sql_text(value)
        elif ".header." in key and secret_name(key.rsplit(".header.", 1)[1]):
            attributes[key] = REDACTED
    redact = _HEADS.get(protocol)
    if redact is not None:
        req_head = redact(req_head) if req_head else req_head
        resp_head = redact(resp_head) if resp_head else resp_head
    return req_head, resp_head
