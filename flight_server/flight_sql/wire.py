"""Flight SQL on the wire: protobuf ``Any`` in and out.

A Flight SQL command is a ``google.protobuf.Any`` whose type URL is
``type.googleapis.com/arrow.flight.protocol.sql.<Message>`` (apache/arrow
format/FlightSql.proto; the subset Quiver reads is proto_docs/flight_sql.proto). Decoding is
bounded like a JSON command (:data:`~flight_server.commands.MAX_COMMAND_BYTES`) and every
malformed input is an :class:`~catalog.InvalidArgument` naming what was wrong — protobuf's
own exceptions never reach a client.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from catalog import InvalidArgument
from catalog.errors import bounded
from flight_server.commands import MAX_COMMAND_BYTES
from flight_server.flight_sql import flight_sql_pb2 as pb

TYPE_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."
_PREFIX_BYTES = TYPE_PREFIX.encode()

#: Every Flight SQL message a descriptor, ticket or action body may carry, by name: those
#: Quiver serves (ingest too) and those it refuses by name (updates). Others are refused as unknown.
#: The metadata commands (flight_server/flight_sql/metadata.py answers each).
METADATA_COMMANDS = (
    pb.CommandGetSqlInfo,
    pb.CommandGetXdbcTypeInfo,
    pb.CommandGetCatalogs,
    pb.CommandGetDbSchemas,
    pb.CommandGetTables,
    pb.CommandGetTableTypes,
    pb.CommandGetPrimaryKeys,
    pb.CommandGetExportedKeys,
    pb.CommandGetImportedKeys,
    pb.CommandGetCrossReference,
)

MESSAGES: dict[str, type[Message]] = {
    cls.DESCRIPTOR.name: cls
    for cls in (
        *METADATA_COMMANDS,
        pb.CommandStatementQuery,
        pb.CommandPreparedStatementQuery,
        pb.TicketStatementQuery,
        pb.ActionCreatePreparedStatementRequest,
        pb.ActionClosePreparedStatementRequest,
        pb.CommandStatementUpdate,
        pb.CommandPreparedStatementUpdate,
        pb.CommandStatementIngest,
    )
}

M = TypeVar("M", bound=Message)


def is_flight_sql(raw: bytes) -> bool:
    """Whether ``raw`` is shaped like a Flight SQL ``Any``: field 1 (the type URL) first, its
    length as a varint, then the URL, starting with :data:`TYPE_PREFIX`. A JSON command starts
    with ``{`` or whitespace — a newline is byte ``0x0a`` too, so the URL's place is checked, not
    just its presence. Cheap: the full decode is :func:`unpack`'s."""
    if raw[:1] != b"\n":
        return False
    start = 1
    while start < min(len(raw), 6) and raw[start] & 0x80:  # the varint's continuation bytes
        start += 1
    start += 1
    return raw[start : start + len(_PREFIX_BYTES)] == _PREFIX_BYTES


def unpack(raw: bytes, what: str = "command") -> Message:
    """The Flight SQL message packed in ``raw`` (an ``Any``)."""
    if len(raw) > MAX_COMMAND_BYTES:
        raise InvalidArgument(
            f"the Flight SQL {what} is {len(raw)} bytes; at most {MAX_COMMAND_BYTES} are accepted"
        )
    wrapper = any_pb2.Any()
    try:
        wrapper.ParseFromString(raw)
    except (DecodeError, RecursionError, ValueError):
        raise InvalidArgument(f"the Flight SQL {what} is not a valid protobuf Any") from None
    url = wrapper.type_url
    if not url.startswith(TYPE_PREFIX):
        raise InvalidArgument(
            f"the Flight SQL {what} has the type URL {bounded(url, 80)!r}; expected "
            f"{TYPE_PREFIX}<Message> (proto_docs/flight-sql.md)"
        )
    name = url[len(TYPE_PREFIX) :]
    cls = MESSAGES.get(name)
    if cls is None:
        raise InvalidArgument(
            f"Flight SQL message {bounded(name, 60)!r} is not supported by Quiver; "
            "proto_docs/flight-sql.md lists the commands it serves"
        )
    message = cls()
    try:
        message.ParseFromString(wrapper.value)
    except (DecodeError, RecursionError, ValueError):
        raise InvalidArgument(f"the Flight SQL {what} is not a valid {name} message") from None
    return message


def unpack_as(raw: bytes, cls: type[M], what: str) -> M:
    """``raw`` (an ``Any``) as the message ``cls``, refused when it is another one."""
    message = unpack(raw, what)
    if not isinstance(message, cls):
        raise InvalidArgument(
            f"{what}: expected a packed {cls.DESCRIPTOR.name}, got {type(message).DESCRIPTOR.name}"
        )
    return message


def pack(message: Message) -> bytes:
    """``message`` packed in an ``Any`` (the spec's type URL prefix)."""
    wrapper = any_pb2.Any()
    wrapper.Pack(message)
    return wrapper.SerializeToString()


def parse_plain(raw: bytes, cls: type[M], what: str) -> M:
    """A message sent as itself, not packed in ``Any`` (Flight's own action bodies)."""
    if len(raw) > MAX_COMMAND_BYTES:
        raise InvalidArgument(
            f"{what}: the body is {len(raw)} bytes; at most {MAX_COMMAND_BYTES} are accepted"
        )
    message = cls()
    try:
        message.ParseFromString(raw)
    except (DecodeError, RecursionError, ValueError):
        raise InvalidArgument(f"{what}: the body is not a valid {cls.DESCRIPTOR.name} message") from None
    return message


def wrap_ticket(handle: bytes) -> bytes:
    """A query endpoint's ticket as Flight SQL clients expect it: ``Any(TicketStatementQuery)``
    around Quiver's own opaque ticket (flight_server/tickets.py)."""
    return pack(pb.TicketStatementQuery(statement_handle=handle))


def unwrap_ticket(raw: bytes) -> bytes:
    """Quiver's ticket inside a Flight SQL ticket; any other ticket is returned as it is."""
    if not is_flight_sql(raw):
        return raw
    return unpack_as(raw, pb.TicketStatementQuery, "ticket").statement_handle
