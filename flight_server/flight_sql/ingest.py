"""``CommandStatementIngest`` (ADBC's ``adbc_ingest``): the upload becomes a new tabular artefact.

Quiver's warehouse tables stay read-only; what an agent ingests is saved exactly as an artefact
DoPut saves it (:func:`flight_server.uploads.save_table`: the same loop, limits, quota and
all-or-nothing commit), owned by the caller, and read back in SQL as ``artefacts."<id>"``
(proto_docs/flight-sql.md, "Ingest"; proto_docs/artefacts.md).

An artefact is immutable and its name is a label, not a key: an ingest never looks a name up,
so there is never an existing table to append to or replace. ``mode="create"`` (if_not_exist
CREATE or unspecified, if_exists FAIL or unspecified) is what happens; ``append``,
``replace`` and ``create_append`` are refused with INVALID_ARGUMENT before a byte is read,
rather than answered by a new artefact the client would take for the old one changed.
``temporary`` gives the artefact a short lifetime (:data:`TEMPORARY_TTL_SECONDS`, or the
configured default when that is shorter). The answer is the raw bytes of
``DoPutUpdateResult`` (not packed in ``Any``) with the rows saved.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow.flight as flight

from catalog import InvalidArgument, Principal
from catalog.artefacts import Artefact, ArtefactStore
from catalog.errors import bounded
from flight_server.flight_sql import flight_sql_pb2 as pb
from flight_server.uploads import save_table

#: Lifetime of an artefact ingested with ``temporary`` set: one hour.
TEMPORARY_TTL_SECONDS = 3600

_Options = pb.CommandStatementIngest.TableDefinitionOptions
IMMUTABLE = (
    "artefacts are immutable and an ingest always saves a new one (ADBC mode='create'); "
    "{what} is not offered: ingest the whole table as a new artefact (and delete the old one "
    "if it is no longer needed); nothing was kept"
)


def check_definition(options: pb.CommandStatementIngest.TableDefinitionOptions) -> None:
    """Refuse the table definition options that would need an existing table."""
    if options.if_exists == _Options.TABLE_EXISTS_OPTION_APPEND:
        raise InvalidArgument(IMMUTABLE.format(what="appending (if_exists APPEND, ADBC mode='append')"))
    if options.if_exists == _Options.TABLE_EXISTS_OPTION_REPLACE:
        raise InvalidArgument(IMMUTABLE.format(what="replacing (if_exists REPLACE, ADBC mode='replace')"))
    if options.if_not_exist == _Options.TABLE_NOT_EXIST_OPTION_FAIL:
        raise InvalidArgument(
            IMMUTABLE.format(what="ingesting into an existing table (if_not_exist FAIL, ADBC mode='append')")
        )


def display_name(message: pb.CommandStatementIngest) -> str:
    """The artefact's name: ``catalog.schema.table`` of what was given — a label only, the
    content is found by the id (an empty table name is refused by the store's name check)."""
    parts = [message.catalog] if message.HasField("catalog") and message.catalog else []
    if message.HasField("schema") and message.schema:
        parts.append(message.schema)
    if not message.table:
        raise InvalidArgument("CommandStatementIngest needs a table name: it becomes the artefact's name")
    return ".".join([*parts, message.table])


def ingest(
    store: ArtefactStore,
    principal: Principal,
    message: pb.CommandStatementIngest,
    reader: flight.MetadataRecordBatchReader,
    cancelled: Callable[[], bool],
) -> Artefact:
    """Save the DoPut's batches as a new tabular artefact owned by ``principal``."""
    check_definition(message.table_definition_options)
    if message.options:
        key = sorted(message.options)[0]
        raise InvalidArgument(
            f"CommandStatementIngest option {bounded(key, 60)!r} is not supported: Quiver takes no "
            "ingest options; nothing was kept"
        )
    ttl = min(TEMPORARY_TTL_SECONDS, store.config.default_ttl_seconds) if message.temporary else None
    return save_table(store, principal, reader, cancelled, name=display_name(message), ttl_seconds=ttl)


def update_result(artefact: Artefact) -> bytes:
    """``DoPutUpdateResult`` with the rows saved, serialized as the spec has it (not in Any)."""
    return pb.DoPutUpdateResult(record_count=artefact.rows or 0).SerializeToString()
