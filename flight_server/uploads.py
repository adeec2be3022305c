"""The one upload loop of the Flight port: a DoPut's record batches into a tabular artefact.

Both DoPuts that save a table go through :func:`save_table` — Quiver's own
``{"kind": "artefact"}`` (flight_server/server.py) and Flight SQL's ``CommandStatementIngest``
(flight_server/flight_sql/dispatch.py) — so both read, bound and fail alike
(proto_docs/artefacts.md): batch by batch into the store's temporary IPC file, never the whole
upload in memory; a failure (a limit, a schema change midway, the client going away) aborts the
writer and nothing is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.flight as flight

from catalog import InvalidArgument, Principal
from catalog.artefacts import Artefact, ArtefactStore
from catalog.errors import Cancelled, bounded


def save_table(
    store: ArtefactStore,
    principal: Principal,
    reader: flight.MetadataRecordBatchReader,
    cancelled: Callable[[], bool],
    *,
    name: str,
    tags: Sequence[str] = (),
    description: str = "",
    ttl_seconds: int | None = None,
) -> Artefact:
    """Stream ``reader`` into a new tabular artefact owned by ``principal`` and commit it.

    ``cancelled`` is the call's ``context.is_cancelled``: a client that went away mid-upload
    (killed, its connection reset) ends the stream just like one that finished, and only the
    call's state tells them apart."""
    with store.begin_write(
        principal,
        "table",
        name,
        schema=_upload_schema(reader, cancelled),
        tags=list(tags),
        description=description,
        ttl_seconds=ttl_seconds,
    ) as upload:
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            except flight.FlightError:
                raise  # the client went away or cancelled: classified as such
            except (pa.ArrowException, OSError) as e:
                # A schema message midway, a malformed batch (Arrow reports both as IOError or
                # Invalid): the client's mistake, never INTERNAL.
                raise InvalidArgument(
                    "the upload could not be read as one Arrow stream of a single schema "
                    f"({bounded(str(e), 200)}); nothing was kept"
                ) from None
            if chunk.data is not None:
                upload.write_batch(chunk.data)
        if cancelled():
            raise Cancelled("the client went away before the upload finished; nothing was kept")
        return upload.commit()


def _upload_schema(reader: flight.MetadataRecordBatchReader, cancelled: Callable[[], bool]) -> pa.Schema:
    """The upload's schema. pyarrow reads the schema message here; a client that sent only
    the descriptor (or hung up first) has none, which Arrow reports as an OSError — the
    client's mistake (or its leaving), never INTERNAL."""
    try:
        return reader.schema
    except (pa.ArrowException, OSError):
        if cancelled():
            raise Cancelled("the client went away before sending the upload; nothing was kept") from None
        raise InvalidArgument(
            "the upload sent no Arrow schema: send the table's schema, then its batches "
            "(a schema without batches is an empty table); nothing was kept"
        ) from None
