"""What tshark decodes from a capture: the exchanges `run.py` expects `deeptrace replay` to find.

Per protocol, a reader turns each of tshark's PDUs (a <proto> element of its PDML output)
into a Msg: a request, a response, an error note or gRPC trailers. `exchanges` pairs them per
connection, by a key where the protocol has one (DNS id, Kafka correlation id, MongoDB
requestID, HTTP/2 stream, MQTT packet id, AMQP channel and method) and in order otherwise.
Nothing here reads our parsers: tshark is the reference.
"""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT_S = 300
# The registry's protocol names -> tshark's dissector. A protocol of ours missing here has no
# tshark dissector (NATS, Dubbo in tshark 4.0) and is reported as not measured.
DISSECTORS = {"http": "http", "http2": "http2", "redis": "resp", "memcached": "memcache",
              "postgresql": "pgsql", "mysql": "mysql", "dns": "dns", "amqp": "amqp", "kafka": "kafka",
              "mongodb": "mongo",
              "mqtt": "mqtt"}  # fmt: skip
# tshark 4.0 has no port for these (h2c is only found after an Upgrade) or loses it to a heuristic
# (27017 is taken for TLS): a payload on the port that tshark left undecoded is given to them.
DEFAULT_PORTS = {"http2": (), "mongodb": (27017,)}
# A folder of the capture tree named like this says which protocol its captures hold.
FOLDER_HINTS = {"http": "http2", "grpc": "http2", "http2": "http2", "postgresql": "postgresql",
                "postgre": "postgresql", "mysql": "mysql", "redis": "redis", "mongo": "mongodb",
                "mongodb": "mongodb", "kafka": "kafka", "amqp": "amqp", "mqtt": "mqtt",
                "memcached": "memcached", "dns": "dns"}  # fmt: skip
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


@dataclass
class Msg:
    kind: str  # "req", "resp", "err" (the open request failed), "trailer" (late status of a stream)
    key: object = None  # pairs a response with its request; None: in order
    name: str = ""  # what tshark calls it, for people
    tokens: tuple = ()  # words our span's name must contain
    error: bool | None = None
    status: str | None = None
    one_way: bool = False  # no response is due (MQTT QoS 0 PUBLISH, memcached quit, ...)
    frame: int | None = None  # where the request starts, when not the frame of the PDU
    time_ns: int | None = None


@dataclass
class Exchange:
    protocol: str
    conn: frozenset
    frame: int
    first_ns: int  # first byte of the request (its first TCP segment)
    last_ns: int  # the frame tshark decoded it in
    name: str
    tokens: tuple
    one_way: bool
    key: object = None
    resp_frame: int | None = None
    error: bool | None = None
    status: str | None = None
    match: object = None  # our span, once matched
    candidates: list = field(default_factory=list)


@dataclass
class Frames:
    """One cheap pass over every frame: times, who serves, and the ports tshark left undecoded."""

    times: dict[int, int] = field(default_factory=dict)  # frame number -> ns
    servers: dict[frozenset, tuple] = field(default_factory=dict)  # connection -> its server (addr, port)
    payload: dict[frozenset, tuple[str, set]] = field(default_factory=dict)  # connection -> (l4, app layers)

    def resolve_servers(self, spans: list) -> None:
        """Who serves each connection: the side that answered the SYN; without a handshake in the
        capture, the side our span calls local (tshark has no say), else the lower port."""
        for s in spans:
            self.servers.setdefault(conn_of(s), server_of(s))
        for conn in self.payload:
            self.servers.setdefault(conn, min(conn, key=lambda end: end[1]))

    def undecoded(self) -> set[tuple[str, int]]:
        """(l4, server port) where tshark decoded no application protocol (TLS is often a wrong guess)."""
        ports: set[tuple[str, int]] = set()
        decoded: set[tuple[str, int]] = set()
        for conn, (l4, layers) in self.payload.items():
            key = (l4, self.servers[conn][1])
            (decoded if layers - {"data", "tls"} else ports).add(key)
        return ports - decoded


def conn_of(span) -> frozenset:
    e = span.endpoint
    return frozenset(((e.laddr, e.lport), (e.raddr, e.rport)))


def server_of(span) -> tuple[str, int]:
    """The side of the connection that answered: a CLIENT span's local side sent the requests."""
    e = span.endpoint
    return (e.laddr, e.lport) if span.kind == "SERVER" else (e.raddr, e.rport)


def ns(epoch: str) -> int:
    sec, _, frac = epoch.partition(".")
    return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])


def run_tshark(args: list[str]) -> str:
    proc = subprocess.run(["tshark", *args], check=False, capture_output=True, timeout=TIMEOUT_S)
    if proc.returncode != 0 and not proc.stdout:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError("tshark: " + (err[-1] if err else f"exit {proc.returncode}"))
    return proc.stdout.decode("utf-8", "replace")


FRAME_FIELDS = ("frame.number", "frame.time_epoch", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport",
                "tcp.dstport", "tcp.len", "tcp.flags.syn", "tcp.flags.ack", "udp.srcport", "udp.dstport",
                "frame.protocols")  # fmt: skip


def frames(path: Path) -> Frames:
    args = ["-r", str(path), "-T", "fields", "-E", "separator=\t"]
    for name in FRAME_FIELDS:
        args += ["-e", name]
    got = Frames()
    for line in run_tshark(args).splitlines():
        cols = line.split("\t")
        if len(cols) < len(FRAME_FIELDS) or not cols[0].isdigit():
            continue
        got.times[int(cols[0])] = ns(cols[1])
        # The last of several values: the innermost header of a tunnelled packet.
        ip4s, ip4d, ip6s, ip6d, tsrc, tdst, tlen, syn, ack, usrc, udst = (
            c.split(",")[-1] for c in cols[2:13]
        )
        src, dst = (ip6s, ip6d) if ip6s else (ip4s, ip4d)
        stack = cols[13].split(":")
        l4 = "tcp" if tsrc else "udp" if usrc else ""
        if not l4 or not src or l4 not in stack:
            continue
        a, b = ((src, int(tsrc)), (dst, int(tdst))) if l4 == "tcp" else ((src, int(usrc)), (dst, int(udst)))
        conn = frozenset((a, b))
        if syn == "1":
            got.servers.setdefault(conn, a if ack == "1" else b)
        if l4 == "tcp" and tlen in ("", "0"):
            continue
        layers = got.payload.setdefault(conn, (l4, set()))[1]
        layers.update(stack[stack.index(l4) + 1 :])
    return got


def pdml(path: Path, decode_as: dict[tuple[str, int], str], protocols: list[str]) -> ET.Element:
    args = ["-r", str(path), "-T", "pdml", "-Y", " || ".join(DISSECTORS[p] for p in protocols)]
    for (l4, port), proto in sorted(decode_as.items()):
        args += ["-d", f"{l4}.port=={port},{DISSECTORS[proto]}"]
    text = _XML_BAD.sub("?", run_tshark(args))
    return ET.fromstring(text) if text.strip() else ET.Element("pdml")


# ---- fields of a PDML element ----


def shows(el: ET.Element, name: str) -> list[str]:
    return [f.get("show", "") for f in el.iter("field") if f.get("name") == name]


def show(el: ET.Element, name: str, default: str | None = None) -> str | None:
    for f in el.iter("field"):
        if f.get("name") == name:
            return f.get("show", "")
    return default


def label(el: ET.Element, name: str) -> str | None:
    """The words tshark shows for a field's value: 'Produce' of 'API Key: Produce (0)'."""
    for f in el.iter("field"):
        if f.get("name") == name:
            text = f.get("showname", "").split(" = ")[-1]
            text = text.split(": ", 1)[-1]
            return re.sub(r"\s*\([^()]*\)$", "", text).strip()
    return None


# ---- one reader per protocol: a tshark PDU -> Msgs ----


def read_http(el: ET.Element, ctx: dict) -> list[Msg]:
    method = show(el, "http.request.method")
    if method is not None:
        uri = show(el, "http.request.uri", "")
        path = uri.split("?")[0]
        if "://" in path:  # a proxy's absolute URI: its path is what names the request
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        return [Msg("req", name=f"{method} {uri}"[:100], tokens=(method, path))]
    code = show(el, "http.response.code")
    if code is None or (code.startswith("1") and code != "101"):  # interim 1xx: the final one follows
        return []
    return [Msg("resp", error=int(code) >= 400, status=code)]


def read_http2(el: ET.Element, ctx: dict) -> list[Msg]:
    msgs = []
    for frame in (f for f in el.iter("field") if f.get("name") == "http2.stream"):
        if show(frame, "http2.type") not in ("1", "9"):  # HEADERS, CONTINUATION
            continue
        stream = show(frame, "http2.streamid")
        headers = dict(
            zip(shows(frame, "http2.header.name"), shows(frame, "http2.header.value"), strict=False)
        )
        if ":method" in headers:
            path = headers.get(":path", "")
            grpc = headers.get("content-type", "").startswith("application/grpc")
            tokens = (path.lstrip("/")[:40],) if grpc else (headers[":method"], path.split("?")[0][:40])
            msgs.append(Msg("req", key=stream, name=f"{headers[':method']} {path}"[:100], tokens=tokens))
        elif ":status" in headers:
            code = headers[":status"]
            grpc = headers.get("grpc-status")
            error = int(code) >= 400 or (grpc is not None and grpc != "0")
            msgs.append(Msg("resp", key=stream, error=error, status=code if grpc is None else f"grpc {grpc}"))
        elif "grpc-status" in headers:
            grpc = headers["grpc-status"]
            msgs.append(Msg("trailer", key=stream, error=grpc != "0", status=f"grpc {grpc}"))
    return msgs


def read_dns(el: ET.Element, ctx: dict) -> list[Msg]:
    key = show(el, "dns.id")
    if show(el, "dns.flags.response") == "0":
        qname, qtype = show(el, "dns.qry.name", ""), (label(el, "dns.qry.type") or "").split(" ")[0]
        qtype = "ANY" if qtype == "*" else qtype
        # Either the type's name or its number names it: ours has no name for the rarer types.
        return [
            Msg("req", key=key, name=f"{qtype} {qname}", tokens=((qtype, show(el, "dns.qry.type")), qname))
        ]
    rcode = label(el, "dns.flags.rcode") or "No error"
    return [Msg("resp", key=key, error=show(el, "dns.flags.rcode", "0") != "0", status=rcode)]


def read_pgsql(el: ET.Element, ctx: dict) -> list[Msg]:
    """A Query, or an extended batch up to its Sync, is one request; ReadyForQuery ends it."""
    kind = show(el, "pgsql.type", "")
    batch = ctx.setdefault("batch", [])  # (frame, time, query) of the messages before Sync
    if show(el, "pgsql.frontend") == "1":
        if kind == "Simple query":
            return [_sql_msg(show(el, "pgsql.query", ""))]
        if kind in ("Parse", "Bind", "Execute", "Describe", "Close"):
            batch.append(
                (ctx["frame"], ctx["first_ns"], show(el, "pgsql.query") if kind == "Parse" else None)
            )
        elif kind == "Sync" and batch:
            query = next((q for _, _, q in batch if q is not None), None)
            msg = _sql_msg(query) if query is not None else Msg("req", name="(extended, no Parse)", tokens=())
            msg.frame, msg.time_ns = batch[0][0], batch[0][1]
            batch.clear()
            return [msg]
        return []
    if kind == "Error":
        return [Msg("err", error=True, status=show(el, "pgsql.code"))]
    if kind == "Ready for query":
        return [Msg("resp")]
    return []


def _sql_msg(query: str) -> Msg:
    words = re.sub(r"/\*.*?\*/|--[^\n]*", " ", query, flags=re.DOTALL).split()
    verb = words[0].upper().rstrip(";") if words else ""
    return Msg("req", name=" ".join(query.split())[:100], tokens=(verb,) if verb else ())


MYSQL_NO_REPLY = ("Quit", "Close Statement", "Send BLOB")  # COM_QUIT, COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA
# tshark's words for a command -> the word a name must hold. None: tshark cannot say what it runs
# (an Execute names its statement only by id; "Sleep" is what tshark calls a command it joined
# mid-connection and could not place), so the name is not judged.
MYSQL_WORDS = {"Use Database": "USE", "Init DB": "USE", "Prepare Statement": "PREPARE",
               "Execute Statement": None, "Close Statement": "STMT_CLOSE", "Show Fields": "FIELD_LIST",
               "Field List": "FIELD_LIST", "Sleep": None}  # fmt: skip


def read_mysql(el: ET.Element, ctx: dict) -> list[Msg]:
    command = label(el, "mysql.command")
    if command is not None:
        if command == "Query":
            msg = _sql_msg(show(el, "mysql.query", ""))
        else:
            word = MYSQL_WORDS.get(command, command.upper().replace(" ", "_"))
            msg = Msg("req", name=command, tokens=(word,) if word else ())
        msg.one_way = command in MYSQL_NO_REPLY
        return [msg]
    if ctx["to_server"] or show(el, "mysql.server_greeting") is not None:
        return []  # a login, or the greeting: not an exchange tshark tells from a request
    code = label(el, "mysql.response_code")
    return [Msg("resp", error=code is not None and "ERR" in code.upper(), status=code)]


def read_resp(el: ET.Element, ctx: dict) -> list[Msg]:
    """Each top-level item of tshark's RESP PDU is one command, or one reply (pipelining packs several)."""
    msgs = []
    for item in el.findall("field"):
        if ctx["to_server"]:
            words = [f.get("showname", "").partition(": ")[2] for f in item.iter("field")
                     if f.get("name") == "resp.bulk_string"]  # fmt: skip
            if not words:  # an inline command: tshark shows it as a fragment of raw bytes
                words = _hex_text(item.get("value", "")).split() or item.get("show", "").split()
            cmd = words[0].upper() if words else ""
            msgs.append(Msg("req", name=" ".join(words)[:100] or "(inline)", tokens=(cmd,)))
        else:
            error = item.get("name") == "resp.error"
            msgs.append(Msg("resp", error=error, status=item.get("show") if error else None))
    return msgs


def _hex_text(value: str) -> str:
    try:
        return bytes.fromhex(value).decode("utf-8", "replace")
    except ValueError:
        return ""


MEMCACHED_ERRORS = ("ERROR", "CLIENT_ERROR", "SERVER_ERROR")


def read_memcache(el: ET.Element, ctx: dict) -> list[Msg]:
    command = show(el, "memcache.command")
    if command is not None:
        noreply = show(el, "memcache.noreply") is not None
        return [Msg("req", name=f"{command} {show(el, 'memcache.key', '')}", tokens=(command.lower(),),
                    one_way=noreply or command.lower() == "quit")]  # fmt: skip
    if ctx["to_server"]:
        return []
    response = show(el, "memcache.response", "")
    return [Msg("resp", error=response.split(" ")[0] in MEMCACHED_ERRORS, status=response or None)]


def read_kafka(el: ET.Element, ctx: dict) -> list[Msg]:
    key = show(el, "kafka.correlation_id")
    title = el.get("showname", "")
    if title.endswith("Request)"):
        api = label(el, "kafka.api_key") or "?"
        return [
            Msg(
                "req",
                key=key,
                name=title[7:-1],
                tokens=(api,),
                one_way=show(el, "kafka.required_acks") == "0",
            )
        ]
    if title.endswith("Response)"):
        errors = [e for e in shows(el, "kafka.error") if e not in ("0", "")]
        return [Msg("resp", key=key, error=bool(errors), status=errors[0] if errors else None)]
    return []


def read_mongo(el: ET.Element, ctx: dict) -> list[Msg]:
    response_to = int(show(el, "mongo.response_to", "0") or "0", 0)
    opcode = label(el, "mongo.opcode") or "?"
    if response_to == 0 and ctx["to_server"]:
        names = [f.get("showname", "").partition(": ")[2] for f in el.iter("field")
                 if f.get("name") == "mongo.element.name"]  # fmt: skip
        first = names[0] if names else opcode
        more = show(el, "mongo.flags.moretocome", "0") == "1"
        request_id = int(show(el, "mongo.request_id", "0") or "0", 0)
        return [Msg("req", key=request_id, name=f"{opcode} {first}", tokens=(first,),
                    one_way=more)]  # fmt: skip
    names = [
        f.get("showname", "").partition(": ")[2]
        for f in el.iter("field")
        if f.get("name") == "mongo.element.name"
    ]
    error = "errmsg" in names or "writeErrors" in names or "$err" in names
    return [Msg("resp", key=response_to, error=error)]


# Server-initiated steps of the AMQP handshake: not requests of the client's.
AMQP_SERVER_STEPS = ("connection.start", "connection.tune", "connection.secure")
AMQP_ONE_WAY = ("basic.publish", "basic.deliver", "basic.ack", "basic.nack", "basic.reject", "basic.return")


def read_amqp(el: ET.Element, ctx: dict) -> list[Msg]:
    if show(el, "amqp.type") != "1":  # method frames only: headers and bodies belong to their method
        return []
    cls, method = (
        (label(el, "amqp.method.class") or "?").lower(),
        (label(el, "amqp.method.method") or "?").lower(),
    )
    channel = show(el, "amqp.channel")
    name = f"{cls}.{method}"
    if method.endswith("-ok") or name == "basic.get-empty":
        base = name[:-3] if method.endswith("-ok") else "basic.get"
        return [Msg("resp", key=(channel, base))]
    if name in AMQP_SERVER_STEPS:
        return []
    error = None
    if method == "close":  # a Close with a reply code other than 200 reports a failure
        code = show(el, "amqp.method.arguments.reply_code")
        error = code not in (None, "200")
        if not ctx["to_server"] and error:  # the broker refuses what the client asked on that channel
            return [Msg("resp", key=(channel, "*"), error=True, status=code)]
    return [
        Msg("req", key=(channel, name), name=name, tokens=(name,), one_way=name in AMQP_ONE_WAY, error=error)
    ]


MQTT_TYPES = {1: "CONNECT", 3: "PUBLISH", 6: "PUBREL", 8: "SUBSCRIBE", 10: "UNSUBSCRIBE", 12: "PINGREQ",
              14: "DISCONNECT"}  # fmt: skip
MQTT_REPLIES = {2: 1, 4: 3, 5: 3, 7: 6, 9: 8, 11: 10, 13: 12}  # reply type -> the request it answers


def read_mqtt(el: ET.Element, ctx: dict) -> list[Msg]:
    kind = int(show(el, "mqtt.msgtype", "0"))
    msgid = show(el, "mqtt.msgid")
    if kind in MQTT_TYPES:
        name = MQTT_TYPES[kind]
        qos = show(el, "mqtt.qos", "0")
        topic = show(el, "mqtt.topic", "") if kind == 3 else ""
        key = (kind, msgid if kind in (3, 6, 8, 10) else None)
        one_way = kind == 14 or (kind == 3 and qos == "0")
        if kind == 3 and not ctx["to_server"]:  # the broker delivering: ours calls it a delivery
            name = ("PUBLISH", "deliver")
        tokens = (name, topic) if topic else (name,)
        said = name if isinstance(name, str) else name[0]
        return [Msg("req", key=key, name=f"{said} {topic}".strip(), tokens=tokens,
                    one_way=one_way)]  # fmt: skip
    if kind in MQTT_REPLIES:
        asked = MQTT_REPLIES[kind]
        key = (asked, msgid if asked in (3, 6, 8, 10) else None)
        codes = shows(el, "mqtt.conack.val") + shows(el, "mqtt.suback.qos")
        error = any(c not in ("0", "1", "2") for c in codes)
        return [Msg("resp", key=key, error=error, status=codes[0] if codes else None)]
    return []


READERS = {"http": read_http, "http2": read_http2, "dns": read_dns, "postgresql": read_pgsql,
           "mysql": read_mysql,
           "redis": read_resp, "memcached": read_memcache, "kafka": read_kafka, "mongodb": read_mongo,
           "amqp": read_amqp, "mqtt": read_mqtt}  # fmt: skip


# ---- packets -> exchanges ----


def _endpoints(packet: ET.Element) -> tuple[tuple, tuple] | None:
    src = dst = sport = dport = None
    for proto in packet.findall("proto"):  # the last IP and transport headers: the innermost
        name = proto.get("name")
        if name in ("ip", "ipv6"):
            src, dst = show(proto, f"{name}.src"), show(proto, f"{name}.dst")
        elif name in ("tcp", "udp"):
            sport, dport = show(proto, f"{name}.srcport"), show(proto, f"{name}.dstport")
    if None in (src, dst, sport, dport):
        return None
    return (src, int(sport)), (dst, int(dport))


def exchanges(root: ET.Element, times: dict[int, int], protocols: list[str], servers: dict) -> list[Exchange]:
    by_dissector = {DISSECTORS[p]: p for p in protocols}
    done: list[Exchange] = []
    open_: dict[tuple, list[Exchange]] = {}  # (protocol, conn) -> requests awaiting their response
    state: dict[tuple, dict] = {}
    for packet in root.iter("packet"):
        ends = _endpoints(packet)
        frame_no = int(show(packet, "frame.number", "0"))
        if ends is None or frame_no not in times:
            continue
        src, dst = ends
        conn = frozenset((src, dst))
        segments = [int(s) for s in shows(packet, "tcp.segment") if s.isdigit()]
        first_ns = min((times.get(s, times[frame_no]) for s in segments), default=times[frame_no])
        for proto_el in packet.findall("proto"):
            protocol = by_dissector.get(proto_el.get("name"))
            if protocol is None:
                continue
            ctx = state.setdefault((protocol, conn), {})
            ctx.update(
                frame=frame_no, first_ns=first_ns, to_server=dst == servers.get(conn, min(conn, key=_port))
            )
            for msg in READERS[protocol](proto_el, ctx):
                waiting = open_.setdefault((protocol, conn), [])
                _apply(msg, protocol, conn, frame_no, first_ns, times[frame_no], waiting,
                       done)  # fmt: skip
            first_ns = times[frame_no]  # a second PDU in the frame starts in it
    return sorted(done, key=lambda e: (e.first_ns, e.frame))


def _port(end: tuple) -> int:
    return end[1]


def _answers(key, asked) -> bool:
    """Whether a response's key is the request's; (channel, "*") answers anything on the channel."""
    if isinstance(key, tuple) and key[-1:] == ("*",):
        return isinstance(asked, tuple) and asked[:1] == key[:1]
    return key == asked


def _apply(msg: Msg, protocol: str, conn: frozenset, frame: int, first_ns: int, last_ns: int,
           waiting: list[Exchange], done: list[Exchange]) -> None:  # fmt: skip
    if msg.kind == "req":
        start = msg.time_ns or first_ns
        ex = Exchange(protocol, conn, msg.frame or frame, start, last_ns, msg.name, msg.tokens,
                      msg.one_way, msg.key, error=msg.error)  # fmt: skip
        done.append(ex)
        if not msg.one_way:
            waiting.append(ex)
        return
    if msg.kind == "trailer":  # gRPC's status comes after the response headers
        for ex in reversed(done):
            if ex.protocol == protocol and ex.conn == conn and ex.key == msg.key:
                ex.error, ex.status = msg.error, msg.status
                return
        return
    ex = next((e for e in waiting if _answers(msg.key, e.key)), None)
    if ex is None:
        return  # the answer to a request from before the capture, or one tshark did not decode
    if msg.kind == "err":
        ex.error, ex.status = True, msg.status or ex.status
        return
    waiting.remove(ex)
    ex.resp_frame = frame
    ex.error = bool(ex.error) or bool(msg.error)
    ex.status = msg.status if msg.status is not None else ex.status
