"""The Calculator service of calc.thrift for the Apache Thrift Python library: structs, a
processor and a client as the library's generated code has them (written by hand: no thrift
compiler here). The library does all the encoding; nothing here writes a byte itself."""

from __future__ import annotations

from thrift.protocol import TBinaryProtocol, TCompactProtocol, TMultiplexedProtocol
from thrift.protocol.TBase import TBase, TExceptionBase
from thrift.Thrift import TApplicationException, TMessageType, TProcessor, TType
from thrift.transport import TTransport

SERVICE = "Calculator"


def _struct(name: str, fields: list[tuple], base=TBase):
    """A struct class from (id, type, name, type args) fields, as generated code declares it."""
    spec = [None] * (max((f[0] for f in fields), default=0) + 1)
    for fid, ttype, fname, args in fields:
        spec[fid] = (fid, ttype, fname, args, None)
    names = tuple(f[2] for f in fields)

    def __init__(self, **kw):
        for n in names:
            setattr(self, n, kw.get(n))

    cls = type(name, (base,), {"__slots__": names, "thrift_spec": tuple(spec), "__init__": __init__})
    if base is TExceptionBase:
        cls.__str__ = lambda self: str(self.message)
    return cls


DivideByZero = _struct("DivideByZero", [(1, TType.STRING, "message", "UTF8")], TExceptionBase)
Point = _struct("Point", [(1, TType.I32, "x", None), (2, TType.I32, "y", None), (3, TType.STRING, "label", "UTF8")])

# name -> (argument fields, result type and args or None for void, declared exceptions, oneway)
METHODS = {
    "ping": ([], None, [], False),
    "add": ([(1, TType.I32, "a", None), (2, TType.I32, "b", None)], (TType.I32, None), [], False),
    "echo": ([(1, TType.STRING, "text", "UTF8")], (TType.STRING, "UTF8"), [], False),
    "divide": ([(1, TType.I32, "a", None), (2, TType.I32, "b", None)], (TType.I32, None),
               [(1, TType.STRUCT, "ouch", (DivideByZero, DivideByZero.thrift_spec))], False),
    "stats": ([(1, TType.MAP, "series", (TType.STRING, "UTF8", TType.LIST, (TType.I64, None, False), False)),
               (2, TType.SET, "flags", (TType.BOOL, None, False)),
               (3, TType.LIST, "points", (TType.STRUCT, (Point, Point.thrift_spec), False)),
               (4, TType.DOUBLE, "scale", None)],
              (TType.LIST, (TType.DOUBLE, None, False)), [], False),
    "crash": ([], (TType.I32, None), [], False),
    "log": ([(1, TType.STRING, "line", "UTF8")], None, [], True),
}  # fmt: skip
ARGS = {name: _struct(f"{name}_args", m[0]) for name, m in METHODS.items()}
RESULTS = {name: _struct(f"{name}_result", ([(0, *m[1][:1], "success", m[1][1])] if m[1] else []) + m[2])
           for name, m in METHODS.items()}  # fmt: skip


class Handler:
    def ping(self):
        return None

    def add(self, a, b):
        return a + b

    def echo(self, text):
        return text

    def divide(self, a, b):
        if b == 0:
            raise DivideByZero(message=f"cannot divide {a} by zero")
        return a // b

    def stats(self, series, flags, points, scale):
        return [sum(v) * scale for _, v in sorted(series.items())] + [float(len(points)), float(len(flags))]

    def crash(self):
        raise RuntimeError("the handler failed")

    def log(self, line):
        self.last_line = line


class Processor(TProcessor):
    """Dispatches a call to the handler and writes the reply, as a generated processor does."""

    def __init__(self, handler) -> None:
        self.handler = handler

    def process(self, iprot, oprot):
        name, _, seqid = iprot.readMessageBegin()
        if name not in METHODS:
            iprot.skip(TType.STRUCT)
            iprot.readMessageEnd()
            self._reply(oprot, name, TMessageType.EXCEPTION, seqid,
                        TApplicationException(TApplicationException.UNKNOWN_METHOD, f"Unknown function {name}"))
            return True
        args = ARGS[name]()
        args.read(iprot)
        iprot.readMessageEnd()
        _, returns, _, oneway = METHODS[name]
        call = getattr(self.handler, name)
        kwargs = {f[2]: getattr(args, f[2]) for f in METHODS[name][0]}
        if oneway:
            call(**kwargs)
            return True
        result = RESULTS[name]()
        try:
            value = call(**kwargs)
            if returns:
                result.success = value
        except DivideByZero as e:
            result.ouch = e
        except Exception as e:  # noqa: BLE001 - what a generated processor does with any other exception
            self._reply(oprot, name, TMessageType.EXCEPTION, seqid,
                        TApplicationException(TApplicationException.INTERNAL_ERROR, str(e)))
            return True
        self._reply(oprot, name, TMessageType.REPLY, seqid, result)
        return True

    @staticmethod
    def _reply(oprot, name, kind, seqid, body):
        oprot.writeMessageBegin(name, kind, seqid)
        body.write(oprot)
        oprot.writeMessageEnd()
        oprot.trans.flush()


class Client:
    """Calls as a generated client makes them. Generated Python clients send seqid 0 on
    every call; counting=True numbers them as the Java and Go libraries do."""

    def __init__(self, prot, counting: bool = False) -> None:
        self.prot = prot
        self.counting = counting
        self.seqid = 0

    def call(self, name: str, **kwargs):
        oneway = name in METHODS and METHODS[name][3]
        if self.counting:
            self.seqid += 1
        self.prot.writeMessageBegin(name, TMessageType.ONEWAY if oneway else TMessageType.CALL, self.seqid)
        (ARGS[name](**kwargs) if name in ARGS else ARGS["ping"]()).write(self.prot)
        self.prot.writeMessageEnd()
        self.prot.trans.flush()
        if oneway:
            return None
        _, kind, _ = self.prot.readMessageBegin()
        if kind == TMessageType.EXCEPTION:
            x = TApplicationException()
            x.read(self.prot)
            self.prot.readMessageEnd()
            raise x
        result = (RESULTS[name] if name in RESULTS else RESULTS["crash"])()
        result.read(self.prot)
        self.prot.readMessageEnd()
        if getattr(result, "ouch", None) is not None:
            raise result.ouch
        return getattr(result, "success", None)


PROTOCOLS = {
    "binary": TBinaryProtocol.TBinaryProtocolFactory(),
    "binary-old": TBinaryProtocol.TBinaryProtocolFactory(strictWrite=False),
    "compact": TCompactProtocol.TCompactProtocolFactory(),
}
TRANSPORTS = {"buffered": TTransport.TBufferedTransportFactory(), "framed": TTransport.TFramedTransportFactory()}


def client_protocol(sock, protocol: str, transport: str, multiplexed: bool):
    trans = TRANSPORTS[transport].getTransport(sock)
    prot = PROTOCOLS[protocol].getProtocol(trans)
    if multiplexed:
        prot = TMultiplexedProtocol.TMultiplexedProtocol(prot, SERVICE)
    return trans, prot


def encode(name: str, kind: int, seqid: int, body, protocol: str = "binary", transport: str = "buffered",
           multiplexed: bool = False) -> bytes:  # fmt: skip
    """One message as the library writes it to a socket."""
    from thrift.transport import TTransport as T

    mem = T.TMemoryBuffer()
    trans, prot = client_protocol(mem, protocol, transport, multiplexed)
    prot.writeMessageBegin(name, kind, seqid)
    body.write(prot)
    prot.writeMessageEnd()
    trans.flush()
    return mem.getvalue()


def call(name: str, seqid: int = 0, **kw) -> bytes:
    """A CALL (or ONEWAY) of a Calculator method with these arguments."""
    oneway = METHODS[name][3] if name in METHODS else False
    args = ARGS[name](**kw.pop("args", {})) if name in ARGS else ARGS["ping"]()
    return encode(name, TMessageType.ONEWAY if oneway else TMessageType.CALL, seqid, args, **kw)


def reply(name: str, seqid: int = 0, success=None, ouch=None, **kw) -> bytes:
    result = RESULTS[name]()
    if success is not None:
        result.success = success
    if ouch is not None:
        result.ouch = ouch
    return encode(name, TMessageType.REPLY, seqid, result, **kw)


def app_error(name: str, kind: int, text: str, seqid: int = 0, **kw) -> bytes:
    return encode(name, TMessageType.EXCEPTION, seqid, TApplicationException(kind, text), **kw)
