"""Apache Kafka wire protocol: every API by name, client id, topic and partition of Produce,
Fetch and Metadata, error codes by name; requests pair with responses by correlation id.
Pure functions of bytes, plus the little a connection must remember: a response does not
say which API it answers, so the parser keeps the requests' (api key, version) by
correlation id (bounded).

Spec: https://kafka.apache.org/protocol ("Protocol Primitive Types", "Headers", "The
Messages", "Error Codes"); field layouts from the message definitions
(clients/src/main/resources/common/message/*.json in apache/kafka).
"""

from __future__ import annotations

import struct
import uuid
from collections import OrderedDict

from deeptrace.protocols.base import Message, message_from
from deeptrace.protocols.framing import INVALID, NEED_MORE, DirectionFramer, Frame, Framed, FramedConnection
from deeptrace.protocols.redaction import REDACTED

PROTOCOL = "kafka"
MAX_REQUEST = 1 << 27  # brokers refuse requests over socket.request.max.bytes (100 MiB by default)
MAX_RESPONSE = 1 << 30
WANT = 512  # bytes of a long message to wait for before framing it (its fields are near the start)
MAX_PENDING = 1024  # requests remembered per connection while their responses are awaited
MAX_ITEMS = 1000  # array elements looked at
MAX_TOPIC_IDS = 256
VERSION_HEADROOM = 3  # newer clients than this table: accept a few versions past the last known

# api key: (name, highest version known, first flexible version or None). From the spec's
# "Api Keys" table and each message's validVersions / flexibleVersions. Versions below a
# message's current minimum are accepted: old clients still send them.
APIS: dict[int, tuple[str, int, int | None]] = {
    0: ("Produce", 13, 9), 1: ("Fetch", 18, 12), 2: ("ListOffsets", 11, 6), 3: ("Metadata", 13, 9),
    4: ("LeaderAndIsr", 7, 4), 5: ("StopReplica", 4, 2), 6: ("UpdateMetadata", 8, 6),
    7: ("ControlledShutdown", 3, 3), 8: ("OffsetCommit", 10, 8), 9: ("OffsetFetch", 10, 6),
    10: ("FindCoordinator", 6, 3), 11: ("JoinGroup", 9, 6), 12: ("Heartbeat", 4, 4), 13: ("LeaveGroup", 5, 4),
    14: ("SyncGroup", 5, 4), 15: ("DescribeGroups", 6, 5), 16: ("ListGroups", 5, 3),
    17: ("SaslHandshake", 1, None), 18: ("ApiVersions", 4, 3), 19: ("CreateTopics", 7, 5),
    20: ("DeleteTopics", 6, 4), 21: ("DeleteRecords", 2, 2), 22: ("InitProducerId", 6, 2),
    23: ("OffsetForLeaderEpoch", 4, 4), 24: ("AddPartitionsToTxn", 5, 3), 25: ("AddOffsetsToTxn", 4, 3),
    26: ("EndTxn", 5, 3), 27: ("WriteTxnMarkers", 2, 1), 28: ("TxnOffsetCommit", 5, 3),
    29: ("DescribeAcls", 3, 2), 30: ("CreateAcls", 3, 2), 31: ("DeleteAcls", 3, 2),
    32: ("DescribeConfigs", 4, 4), 33: ("AlterConfigs", 2, 2), 34: ("AlterReplicaLogDirs", 2, 2),
    35: ("DescribeLogDirs", 5, 2), 36: ("SaslAuthenticate", 2, 2), 37: ("CreatePartitions", 3, 2),
    38: ("CreateDelegationToken", 3, 2), 39: ("RenewDelegationToken", 2, 2),
    40: ("ExpireDelegationToken", 2, 2), 41: ("DescribeDelegationToken", 3, 2), 42: ("DeleteGroups", 2, 2),
    43: ("ElectLeaders", 2, 2), 44: ("IncrementalAlterConfigs", 1, 1),
    45: ("AlterPartitionReassignments", 1, 0), 46: ("ListPartitionReassignments", 0, 0),
    47: ("OffsetDelete", 0, None), 48: ("DescribeClientQuotas", 1, 1), 49: ("AlterClientQuotas", 1, 1),
    50: ("DescribeUserScramCredentials", 0, 0), 51: ("AlterUserScramCredentials", 0, 0), 52: ("Vote", 1, 0),
    53: ("BeginQuorumEpoch", 1, 0), 54: ("EndQuorumEpoch", 1, 0), 55: ("DescribeQuorum", 2, 0),
    56: ("AlterPartition", 3, 0), 57: ("UpdateFeatures", 2, 0), 58: ("Envelope", 0, 0),
    59: ("FetchSnapshot", 1, 0), 60: ("DescribeCluster", 2, 0), 61: ("DescribeProducers", 0, 0),
    62: ("BrokerRegistration", 4, 0), 63: ("BrokerHeartbeat", 1, 0), 64: ("UnregisterBroker", 0, 0),
    65: ("DescribeTransactions", 0, 0), 66: ("ListTransactions", 2, 0), 67: ("AllocateProducerIds", 0, 0),
    68: ("ConsumerGroupHeartbeat", 1, 0), 69: ("ConsumerGroupDescribe", 0, 0),
    70: ("ControllerRegistration", 0, 0), 71: ("GetTelemetrySubscriptions", 0, 0),
    72: ("PushTelemetry", 0, 0), 73: ("AssignReplicasToDirs", 0, 0), 74: ("ListConfigResources", 1, 0),
    75: ("DescribeTopicPartitions", 0, 0), 76: ("ShareGroupHeartbeat", 0, 0),
    77: ("ShareGroupDescribe", 0, 0), 78: ("ShareFetch", 0, 0), 79: ("ShareAcknowledge", 0, 0),
    80: ("AddRaftVoter", 0, 0), 81: ("RemoveRaftVoter", 0, 0), 82: ("UpdateRaftVoter", 0, 0),
    83: ("InitializeShareGroupState", 0, 0), 84: ("ReadShareGroupState", 0, 0),
    85: ("WriteShareGroupState", 0, 0), 86: ("DeleteShareGroupState", 0, 0),
    87: ("ReadShareGroupStateSummary", 0, 0), 88: ("StreamsGroupHeartbeat", 0, 0),
    89: ("StreamsGroupDescribe", 0, 0), 90: ("DescribeShareGroupOffsets", 0, 0),
    91: ("AlterShareGroupOffsets", 0, 0), 92: ("DeleteShareGroupOffsets", 0, 0),
}  # fmt: skip
PRODUCE, FETCH, METADATA, SASL_HANDSHAKE, API_VERSIONS, SASL_AUTHENTICATE = 0, 1, 3, 17, 18, 36
# Requests and responses that can carry credentials (SASL tokens, delegation token HMACs,
# SCRAM salted passwords, config values such as ssl.keystore.password, and Envelope, which wraps
# any of these as a broker forwards it): heads stop at the header.
SECRET_APIS = frozenset({SASL_AUTHENTICATE, 33, 38, 39, 40, 41, 44, 51, 58})
# Group APIs whose request body starts with the group id (OffsetFetch: up to v7).
GROUP_FIRST = {8: 99, 9: 7, 11: 99, 12: 99, 13: 99, 14: 99}

# Spec "Error Codes": code -> name, -1 and 0..128.
_ERROR_TEXT = (
    "NONE OFFSET_OUT_OF_RANGE CORRUPT_MESSAGE UNKNOWN_TOPIC_OR_PARTITION INVALID_FETCH_SIZE "
    "LEADER_NOT_AVAILABLE NOT_LEADER_OR_FOLLOWER REQUEST_TIMED_OUT BROKER_NOT_AVAILABLE "
    "REPLICA_NOT_AVAILABLE MESSAGE_TOO_LARGE STALE_CONTROLLER_EPOCH OFFSET_METADATA_TOO_LARGE "
    "NETWORK_EXCEPTION COORDINATOR_LOAD_IN_PROGRESS COORDINATOR_NOT_AVAILABLE NOT_COORDINATOR "
    "INVALID_TOPIC_EXCEPTION RECORD_LIST_TOO_LARGE NOT_ENOUGH_REPLICAS NOT_ENOUGH_REPLICAS_AFTER_APPEND "
    "INVALID_REQUIRED_ACKS ILLEGAL_GENERATION INCONSISTENT_GROUP_PROTOCOL INVALID_GROUP_ID "
    "UNKNOWN_MEMBER_ID INVALID_SESSION_TIMEOUT REBALANCE_IN_PROGRESS INVALID_COMMIT_OFFSET_SIZE "
    "TOPIC_AUTHORIZATION_FAILED GROUP_AUTHORIZATION_FAILED CLUSTER_AUTHORIZATION_FAILED INVALID_TIMESTAMP "
    "UNSUPPORTED_SASL_MECHANISM ILLEGAL_SASL_STATE UNSUPPORTED_VERSION TOPIC_ALREADY_EXISTS "
    "INVALID_PARTITIONS INVALID_REPLICATION_FACTOR INVALID_REPLICA_ASSIGNMENT INVALID_CONFIG "
    "NOT_CONTROLLER INVALID_REQUEST UNSUPPORTED_FOR_MESSAGE_FORMAT POLICY_VIOLATION "
    "OUT_OF_ORDER_SEQUENCE_NUMBER DUPLICATE_SEQUENCE_NUMBER INVALID_PRODUCER_EPOCH INVALID_TXN_STATE "
    "INVALID_PRODUCER_ID_MAPPING INVALID_TRANSACTION_TIMEOUT CONCURRENT_TRANSACTIONS "
    "TRANSACTION_COORDINATOR_FENCED TRANSACTIONAL_ID_AUTHORIZATION_FAILED SECURITY_DISABLED "
    "OPERATION_NOT_ATTEMPTED KAFKA_STORAGE_ERROR LOG_DIR_NOT_FOUND SASL_AUTHENTICATION_FAILED "
    "UNKNOWN_PRODUCER_ID REASSIGNMENT_IN_PROGRESS DELEGATION_TOKEN_AUTH_DISABLED "
    "DELEGATION_TOKEN_NOT_FOUND DELEGATION_TOKEN_OWNER_MISMATCH DELEGATION_TOKEN_REQUEST_NOT_ALLOWED "
    "DELEGATION_TOKEN_AUTHORIZATION_FAILED DELEGATION_TOKEN_EXPIRED INVALID_PRINCIPAL_TYPE "
    "NON_EMPTY_GROUP GROUP_ID_NOT_FOUND FETCH_SESSION_ID_NOT_FOUND INVALID_FETCH_SESSION_EPOCH "
    "LISTENER_NOT_FOUND TOPIC_DELETION_DISABLED FENCED_LEADER_EPOCH UNKNOWN_LEADER_EPOCH "
    "UNSUPPORTED_COMPRESSION_TYPE STALE_BROKER_EPOCH OFFSET_NOT_AVAILABLE MEMBER_ID_REQUIRED "
    "PREFERRED_LEADER_NOT_AVAILABLE GROUP_MAX_SIZE_REACHED FENCED_INSTANCE_ID "
    "ELIGIBLE_LEADERS_NOT_AVAILABLE ELECTION_NOT_NEEDED NO_REASSIGNMENT_IN_PROGRESS "
    "GROUP_SUBSCRIBED_TO_TOPIC INVALID_RECORD UNSTABLE_OFFSET_COMMIT THROTTLING_QUOTA_EXCEEDED "
    "PRODUCER_FENCED RESOURCE_NOT_FOUND DUPLICATE_RESOURCE UNACCEPTABLE_CREDENTIAL INCONSISTENT_VOTER_SET "
    "INVALID_UPDATE_VERSION FEATURE_UPDATE_FAILED PRINCIPAL_DESERIALIZATION_FAILURE SNAPSHOT_NOT_FOUND - "
    "UNKNOWN_TOPIC_ID DUPLICATE_BROKER_REGISTRATION BROKER_ID_NOT_REGISTERED INCONSISTENT_TOPIC_ID "
    "INCONSISTENT_CLUSTER_ID TRANSACTIONAL_ID_NOT_FOUND FETCH_SESSION_TOPIC_ID_ERROR INELIGIBLE_REPLICA "
    "NEW_LEADER_ELECTED OFFSET_MOVED_TO_TIERED_STORAGE FENCED_MEMBER_EPOCH UNRELEASED_INSTANCE_ID "
    "UNSUPPORTED_ASSIGNOR STALE_MEMBER_EPOCH MISMATCHED_ENDPOINT_TYPE UNSUPPORTED_ENDPOINT_TYPE "
    "UNKNOWN_CONTROLLER_ID UNKNOWN_SUBSCRIPTION_ID TELEMETRY_TOO_LARGE INVALID_REGISTRATION "
    "TRANSACTION_ABORTABLE INVALID_RECORD_STATE SHARE_SESSION_NOT_FOUND INVALID_SHARE_SESSION_EPOCH "
    "FENCED_STATE_EPOCH INVALID_VOTER_KEY DUPLICATE_VOTER VOTER_NOT_FOUND INVALID_REGULAR_EXPRESSION"
)
_ERROR_NAMES = _ERROR_TEXT.split()


def error_name(code: int) -> str:
    if code == -1:
        return "UNKNOWN_SERVER_ERROR"
    if 0 <= code < len(_ERROR_NAMES) and _ERROR_NAMES[code] != "-":
        return _ERROR_NAMES[code]
    return str(code)


# Responses whose body starts with a top-level error code, optionally after throttle_time_ms:
# api key -> (version from which throttle_time_ms (int32) comes first, versions that have the code).
_NEVER = 1 << 16
_TOP_ERROR: dict[int, tuple[int, int, int]] = {
    **{k: (_NEVER, 0, _NEVER) for k in (4, 5, 6, 7, 17, 18, 36, 38, 39, 40, 41, 47, 52, 53, 54, 55)},
    10: (1, 0, 3), 11: (2, 0, _NEVER), 12: (1, 0, _NEVER), 13: (1, 0, _NEVER), 14: (1, 0, _NEVER),
    16: (1, 0, _NEVER), 24: (0, 4, _NEVER), 35: (0, 3, _NEVER), 43: (0, 1, _NEVER),
    45: (0, 0, 0),  # v1 puts allow_replication_factor_change before the code
    **{k: (0, 0, _NEVER) for k in (22, 25, 26, 29, 46, 48, 50, 56, 57, 59, 60, 62, 63, 64, 66, 67, 68, 70, 71,
                                   72, 73, 74, 76, 78, 79, 80, 81, 82)},
}  # fmt: skip

_I16, _I32, _HDR = struct.Struct(">h"), struct.Struct(">i"), struct.Struct(">ihhi")


def flexible(key: int, version: int) -> bool:
    first = APIS[key][2] if key in APIS else None
    return first is not None and version >= first


def request_header_version(key: int, version: int) -> int:
    """Spec "Headers": v0 (no client id) only for ControlledShutdown v0; v2 (tagged fields)
    when the request version is flexible; else v1."""
    if key == 7 and version == 0:
        return 0
    return 2 if flexible(key, version) else 1


def response_header_flexible(key: int, version: int) -> bool:
    # ApiVersions responses always use header v0, so that any client can read them.
    return key != API_VERSIONS and flexible(key, version)


class _Short(Exception):
    """The bytes end before the field."""


class _Reader:
    """A cursor over one message's bytes, for the spec's primitive types; compact (varint
    length + 1) strings and arrays when the version is flexible."""

    __slots__ = ("buf", "compact", "pos")

    def __init__(self, buf: bytes, pos: int, compact: bool) -> None:
        self.buf, self.pos, self.compact = buf, pos, compact

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise _Short
        self.pos = start + n
        return start

    def i8(self) -> int:
        return self.buf[self.take(1)]

    def i16(self) -> int:
        return _I16.unpack_from(self.buf, self.take(2))[0]

    def i32(self) -> int:
        return _I32.unpack_from(self.buf, self.take(4))[0]

    def uvarint(self) -> int:
        value = 0
        for shift in range(0, 35, 7):  # an int32 fits in 5 bytes
            byte = self.i8()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
        raise _Short  # not a varint: treat as cut

    def length(self, wide: bool) -> int:
        """A string's, bytes' or array's length; -1 for null."""
        if self.compact:
            return self.uvarint() - 1
        return self.i32() if wide else self.i16()

    def string(self) -> str | None:
        n = self.length(False)
        if n < 0:
            return None
        return self.buf[self.take(n) : self.pos].decode("utf-8", "replace")

    def skip_bytes(self) -> None:
        self.take(max(self.length(True), 0))

    def array(self) -> int:
        n = self.length(True)
        return min(n, MAX_ITEMS) if n > 0 else 0

    def uuid(self) -> str:
        return str(uuid.UUID(bytes=self.buf[self.take(16) : self.pos]))

    def tags(self) -> None:
        """Tagged fields (flexible versions only): count, then (tag, size, bytes) each."""
        if not self.compact:
            return
        for _ in range(min(self.uvarint(), MAX_ITEMS)):
            self.uvarint()
            self.take(self.uvarint())


# ---- detection ----

def _known(key: int, version: int) -> bool:
    api = APIS.get(key)
    return api is not None and 0 <= version <= api[1] + VERSION_HEADROOM


def _printable(raw: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in raw)


def starts_request(data: bytes) -> bool:
    """A request header: plausible size, a known api key, a version in its range, and a
    client id that is printable text (or null). Any request can be the first we see."""
    if len(data) < 12:
        return False
    size, key, version, _ = _HDR.unpack_from(data)
    if not 8 <= size <= MAX_REQUEST or not _known(key, version):
        return False
    if request_header_version(key, version) == 0:
        return size == 12  # ControlledShutdown v0: broker id only
    if len(data) < 14:
        return False
    n = _I16.unpack_from(data, 12)[0]
    if n == -1:
        return True
    return 0 <= n <= min(size - 10, 1024) and len(data) >= 14 + n and _printable(data[14 : 14 + n])


def starts_response(data: bytes) -> bool:
    # A response is a size and a correlation id: nothing marks it as Kafka.
    return False


# ---- requests ----

def _skip_topic(r: _Reader, by_id: bool) -> None:
    """A topic's name, or its id (v13+ of Produce and Fetch)."""
    if by_id:
        r.take(16)
    else:
        r.string()


def _first_topic(r: _Reader, version: int, fields: dict) -> None:
    """Produce's and Fetch's topics: how many, and the first one's name or id (v13+) and its
    first partition: [topic: name|topic_id [partition: index ...] ...]."""
    count = r.array()
    fields["topic_count"] = count
    if count:
        if version >= 13:
            fields["topic_id"] = r.uuid()
        else:
            fields["topic"] = r.string()
        fields["partition_count"] = r.array()
        if fields["partition_count"]:
            fields["partition"] = r.i32()


def _produce_request(r: _Reader, version: int, fields: dict) -> None:
    # ProduceRequest: [transactional_id (v3+)] acks timeout_ms [topic_data ...]
    if version >= 3:
        r.string()
    fields["acks"] = r.i16()
    r.i32()
    _first_topic(r, version, fields)


def _fetch_request(r: _Reader, version: int, fields: dict) -> None:
    # FetchRequest: replica_id (v0-14) max_wait_ms min_bytes [max_bytes v3+] [isolation_level v4+]
    # [session_id session_epoch v7+] [topics ...]
    if version <= 14:
        r.i32()
    r.take(8 + (4 if version >= 3 else 0) + (1 if version >= 4 else 0) + (8 if version >= 7 else 0))
    _first_topic(r, version, fields)


def _metadata_request(r: _Reader, version: int, fields: dict) -> None:
    # MetadataRequest: topics (null = all, v1+): [name (v0-9) | topic_id name (v10+)]
    count = r.length(True)
    if count < 0:
        return
    fields["topic_count"] = count
    if count:
        if version >= 10:
            r.uuid()
        name = r.string()
        if name:
            fields["topic"] = name


def frame_request(buf: bytes) -> Frame | str:
    if len(buf) < 12:
        return NEED_MORE
    size, key, version, _ = _HDR.unpack_from(buf)
    if not 8 <= size <= MAX_REQUEST or not _known(key, version):
        return INVALID
    length = size + 4
    if len(buf) < min(length, WANT):
        return NEED_MORE
    fields = parse_request(buf[:length])
    return INVALID if fields is None else Frame(length, fields)


def parse_request(buf: bytes) -> dict | None:
    """The fields of a request, from as many of its bytes as are here; None if even its
    header is cut or not Kafka's."""
    if len(buf) < 12:
        return None
    _, key, version, corr = _HDR.unpack_from(buf)
    if not _known(key, version):
        return None
    fields: dict = {"key": key, "version": version, "corr": corr}
    header = request_header_version(key, version)
    r = _Reader(buf, 12, False)
    try:
        if header >= 1:
            client = r.string()  # always a classic string, even in header v2
            if client is not None and not _printable(client.encode()):
                return None
            fields["client_id"] = client
        r.compact = header == 2
        r.tags()
        fields["body"] = r.pos  # where the body starts: heads of secret APIs stop here
        if key == PRODUCE:
            _produce_request(r, version, fields)
        elif key == FETCH:
            _fetch_request(r, version, fields)
        elif key == METADATA:
            _metadata_request(r, version, fields)
        elif GROUP_FIRST.get(key, -1) >= version:
            fields["group"] = r.string()
    except (_Short, UnicodeError):
        pass
    return fields


# ---- responses ----

def _note_error(fields: dict, code: int) -> None:
    if code:
        fields["errors"] = fields.get("errors", 0) + 1
        fields.setdefault("error_code", code)


def _produce_response(r: _Reader, version: int, fields: dict) -> None:
    # ProduceResponse: [responses: name|topic_id (v13+) [partitions: index error_code base_offset
    # [log_append_time v2+] [log_start_offset v5+] [record_errors error_message v8+] tags] tags]
    for _ in range(r.array()):
        _skip_topic(r, version >= 13)
        for _ in range(r.array()):
            r.i32()
            _note_error(fields, r.i16())
            r.take(8 + (8 if version >= 2 else 0) + (8 if version >= 5 else 0))
            if version >= 8:
                for _ in range(r.array()):
                    r.i32()
                    r.string()
                r.string()
            r.tags()
        r.tags()


def _fetch_response(r: _Reader, version: int, fields: dict) -> None:
    # FetchResponse: [throttle v1+] [error_code session_id v7+] [responses: topic|topic_id (v13+)
    # [partitions: index error_code high_watermark [last_stable_offset v4+] [log_start_offset v5+]
    # [aborted_transactions v4+] [preferred_read_replica v11+] records tags] tags]
    if version >= 1:
        r.i32()
    if version >= 7:
        _note_error(fields, r.i16())
        r.i32()
    for _ in range(r.array()):
        _skip_topic(r, version >= 13)
        for _ in range(r.array()):
            r.i32()
            _note_error(fields, r.i16())
            r.take(8 + (8 if version >= 4 else 0) + (8 if version >= 5 else 0))
            if version >= 4:
                for _ in range(r.array()):
                    r.take(16)
                    r.tags()
            if version >= 11:
                r.i32()
            r.skip_bytes()  # the records: usually past what is captured, which ends the walk
            r.tags()
        r.tags()


def _metadata_response(r: _Reader, version: int, fields: dict) -> None:
    # MetadataResponse: [throttle v3+] [brokers: node_id host port [rack v1+] tags] [cluster_id v2+]
    # [controller_id v1+] [topics: error_code name [topic_id v10+] [is_internal v1+]
    # [partitions: error_code index leader [leader_epoch v7+] [replicas] [isr] [offline v5+] tags]
    # [authorized_operations v8+] tags] ...
    if version >= 3:
        r.i32()
    for _ in range(r.array()):
        r.i32()
        r.string()
        r.i32()
        if version >= 1:
            r.string()
        r.tags()
    if version >= 2:
        r.string()
    if version >= 1:
        r.i32()
    ids: dict[str, str] = {}
    fields["topic_ids"] = ids
    for _ in range(r.array()):
        _note_error(fields, r.i16())
        name = r.string()
        if version >= 10:
            topic_id = r.uuid()
            if name and len(ids) < MAX_TOPIC_IDS:
                ids[topic_id] = name
        if version >= 1:
            r.i8()
        for _ in range(r.array()):
            r.take(10 + (4 if version >= 7 else 0))
            for _ in range(3 if version >= 5 else 2):
                r.take(4 * r.array())
            r.tags()
        if version >= 8:
            r.i32()
        r.tags()


def parse_response(buf: bytes, request: tuple[int, int] | None) -> dict | None:
    """Fields of a response, given the (api key, version) of the request it answers (None:
    that request was not seen, so only the correlation id can be read)."""
    if len(buf) < 8:
        return None
    fields: dict = {"corr": _I32.unpack_from(buf, 4)[0]}
    if request is None:
        return fields
    key, version = request
    fields["key"], fields["version"] = key, version
    r = _Reader(buf, 8, False)
    try:
        if response_header_flexible(key, version):
            r.compact = True
            r.tags()
        fields["body"] = r.pos
        r.compact = flexible(key, version)
        if key == PRODUCE:
            _produce_response(r, version, fields)
        elif key == FETCH:
            _fetch_response(r, version, fields)
        elif key == METADATA:
            _metadata_response(r, version, fields)
        elif key in _TOP_ERROR:
            throttle_from, first, last = _TOP_ERROR[key]
            if first <= version <= last:
                if version >= throttle_from:
                    r.i32()
                _note_error(fields, r.i16())
    except (_Short, UnicodeError):
        pass
    return fields


# ---- one connection ----

class KafkaConnection(FramedConnection):
    protocol = PROTOCOL

    def __init__(self) -> None:
        super().__init__(DirectionFramer(self._frame_request, starts_request, self._salvage_request),
                         DirectionFramer(self._frame_response, self._starts_response))  # fmt: skip
        # correlation id -> (api key, version) of requests awaiting a response
        self._pending: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._topic_ids: OrderedDict[str, str] = OrderedDict()  # learned from Metadata responses
        # After SaslHandshake v0 the SASL tokens travel as bare size-prefixed frames, no header.
        self._raw_sasl = False

    # -- requests --

    def _frame_request(self, buf: bytes) -> Frame | str:
        if self._raw_sasl and len(buf) >= 4:
            size = _I32.unpack_from(buf)[0]
            if 0 <= size <= 1 << 16 and not starts_request(buf[: size + 4]):
                return Frame(size + 4, {"sasl_token": True})
        return frame_request(buf)

    @staticmethod
    def _salvage_request(buf: bytes) -> dict | None:
        return parse_request(buf)

    def _request(self, f: Framed) -> Message:
        fields = f.fields
        if fields.get("sasl_token"):
            return message_from(f, PROTOCOL, True, name="kafka SASL token", expects_response=False,
                                attributes={"messaging.system": "kafka"},
                                head=f.head[:4] + REDACTED.encode())  # fmt: skip
        self._raw_sasl = False
        key, version, corr = fields["key"], fields["version"], fields["corr"]
        api = APIS[key][0]
        attrs = {"messaging.system": "kafka", "messaging.operation.name": api,
                 "messaging.kafka.api_version": version}  # fmt: skip
        if key == PRODUCE:
            attrs["messaging.operation.type"] = "send"
        elif key == FETCH:
            attrs["messaging.operation.type"] = "receive"
        if fields.get("client_id"):
            attrs["messaging.client.id"] = fields["client_id"]
        if fields.get("group"):
            attrs["messaging.consumer.group.name"] = fields["group"]
        # v13+ names topics by id: named from a Metadata response on this connection, if one told.
        topic = fields.get("topic") or self._topic_ids.get(fields.get("topic_id"))
        name = f"kafka {api}"
        if fields.get("topic_count", 1) > 1:
            attrs["messaging.kafka.topic_count"] = fields["topic_count"]
        elif topic:
            attrs["messaging.destination.name"] = topic
            name += " " + topic
            if fields.get("partition_count") == 1 and "partition" in fields:
                attrs["messaging.destination.partition.id"] = str(fields["partition"])
        elif fields.get("topic_id"):
            attrs["messaging.kafka.topic_id"] = fields["topic_id"]
        one_way = key == PRODUCE and fields.get("acks") == 0  # acks=0: the broker never answers
        if key == SASL_HANDSHAKE and version == 0:
            self._raw_sasl = True
        if not one_way:
            self._pending[corr] = (key, version)
            self._pending.move_to_end(corr)
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        return message_from(f, PROTOCOL, True, name=name, attributes=attrs, pair_key=corr,
                            head=_head(f.head, fields), expects_response=not one_way)  # fmt: skip

    # -- responses --

    def _starts_response(self, data: bytes) -> bool:
        if len(data) < 8:
            return False
        size, corr = struct.unpack_from(">ii", data)
        return 4 <= size <= MAX_RESPONSE and corr in self._pending

    def _frame_response(self, buf: bytes) -> Frame | str:
        if self._raw_sasl and len(buf) >= 4 and 0 <= _I32.unpack_from(buf)[0] < 4:
            # A bare SASL token too short to hold a correlation id (PLAIN's empty answer).
            return Frame(_I32.unpack_from(buf)[0] + 4, {"sasl_token": True})
        if len(buf) < 8:
            return NEED_MORE
        size, corr = struct.unpack_from(">ii", buf)
        if not 4 <= size <= MAX_RESPONSE:
            return INVALID
        length = size + 4
        if len(buf) < min(length, WANT):
            return NEED_MORE
        return Frame(length, parse_response(buf[:length], self._pending.get(corr)))

    def _response(self, f: Framed) -> Message | None:
        fields = f.fields
        if fields.get("sasl_token") or fields.get("corr") is None:
            return None
        corr = fields["corr"]
        if self._raw_sasl and corr not in self._pending:
            return None  # a SASL token of the server's
        self._pending.pop(corr, None)
        for topic_id, name in fields.get("topic_ids", {}).items():
            self._topic_ids[topic_id] = name
            while len(self._topic_ids) > MAX_TOPIC_IDS:
                self._topic_ids.popitem(last=False)
        attrs: dict = {}
        code = fields.get("error_code", 0)
        status = None
        if code:
            status = error_name(code)
            attrs["error.type"] = status
            attrs["messaging.kafka.error_count"] = fields["errors"]
        return message_from(f, PROTOCOL, False, error=bool(code), status_code=status, pair_key=corr,
                            attributes=attrs, head=_head(f.head, fields))  # fmt: skip


def _head(head: bytes, fields: dict) -> bytes:
    """A head with the body of credential-carrying APIs cut off (and anything after the
    header when the API is not known: an unknown response could be a SASL token's answer)."""
    key = fields.get("key")
    if key in SECRET_APIS or key is None:
        return head[: fields.get("body", 8)] + REDACTED.encode()
    return head
