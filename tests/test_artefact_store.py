"""The artefact store (catalog/artefacts.py) on a real Catalog: real DuckDB file, real data
directory, principals from real tokens."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from catalog import Catalog, Principal
from catalog.artefacts import TEMP_PREFIX, ArtefactFilter, ArtefactStore, is_artefact_id, new_id
from catalog.database import SYSTEM_SCHEMA
from catalog.errors import InvalidArgument, NotFound, PayloadTooLarge, PermissionDenied, Unprocessable
from tests.harness import make_config, wait_until

TABLE = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "label": ["a", "b", None]})


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog(
        make_config(
            tmp_path / "data",
            artefacts={"max_upload_bytes": 200_000, "swarm_quota_bytes": 300_000, "swarm_quota_count": 5},
        )
    )
    for name in ("s1", "s2", "s3"):
        c.swarms.create(name)
    yield c
    c.close()


def who(c: Catalog, kind: str, swarm: str | None = None, agent: str | None = None) -> Principal:
    issued = c.tokens.mint(None, kind, swarm=swarm, agent=agent)
    return c.tokens.verify(issued.token)


def save_table(store: ArtefactStore, p: Principal, table: pa.Table = TABLE, **kw: object):
    with store.begin_write(p, "table", kw.pop("name", "t"), schema=table.schema, **kw) as w:  # type: ignore[arg-type]
        w.write_table(table)
        return w.commit()


def files(store: ArtefactStore) -> list[str]:
    return sorted(os.listdir(store.directory))


def meta_rows(c: Catalog) -> int:
    with c.db.reading() as cur:
        return int(cur.execute(f"SELECT count(*) FROM {SYSTEM_SCHEMA}.artefacts").fetchall()[0][0])


def test_new_ids_are_uuid7_unique_and_sorted() -> None:
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(is_artefact_id(i) for i in ids)
    assert not is_artefact_id("../../etc/passwd")


def test_table_round_trip_and_metadata(catalog: Catalog) -> None:
    store = catalog.artefacts
    a1 = who(catalog, "agent", "s1", "a1")
    art = save_table(
        store, a1, name="../../etc/passwd", tags=["x", "y", "x"], description="d", ttl_seconds=60
    )
    assert art.kind == "table" and art.rows == 3 and art.tags == ["x", "y"]
    assert art.name == "../../etc/passwd"
    assert art.owner == "agent:s1/a1" and art.swarm == "s1" and art.owner_agent == "a1"
    assert [c.name for c in art.columns or []] == ["id", "label"]
    # Content under the id only, nowhere else.
    assert files(store) == [art.id]
    assert not (catalog.data_dir / "etc").exists()
    _, reader = store.open_table(a1, art.id)
    assert reader.read_all().equals(TABLE)
    # The SQL copy holds the same rows.
    with catalog.db.reading() as cur:
        assert cur.sql(f"SELECT * FROM {art.sql_name} ORDER BY id").arrow().read_all().equals(TABLE)
    # Survives a restart (index rebuilt from the catalog).
    again = ArtefactStore(
        catalog.db,
        catalog.config.artefacts,
        store.directory,
        store.writes,
        swarm_instance=catalog.swarms.instance,
    )
    assert again.get(a1, art.id) == art


def test_file_round_trip(catalog: Catalog) -> None:
    store = catalog.artefacts
    p = who(catalog, "swarm", "s1")
    with store.begin_write(p, "file", "notes.txt", media_type="text/plain", format="txt") as w:
        w.write(b"hello ")
        w.write(b"world")
        art = w.commit()
    assert art.size_bytes == 11 and art.rows is None and art.sql_name is None
    import hashlib

    assert art.sha256 == hashlib.sha256(b"hello world").hexdigest()
    _, f = store.open_content(p, art.id)
    with f:
        assert f.read() == b"hello world"


def test_visibility_matrix(catalog: Catalog) -> None:
    store = catalog.artefacts
    owner = who(catalog, "agent", "s1", "a1")
    mate = who(catalog, "agent", "s1", "a2")
    swarm_token = who(catalog, "swarm", "s1")
    other = who(catalog, "agent", "s2", "b1")
    shared_agent = who(catalog, "agent", "s3", "c1")
    other_in_s3 = who(catalog, "agent", "s3", "c2")
    admin = who(catalog, "admin")
    art = save_table(store, owner)
    for p in (owner, mate, swarm_token, admin):
        assert store.get(p, art.id).id == art.id
        assert store.readable_table(p, art.id) is not None
    for p in (other, shared_agent, other_in_s3):
        with pytest.raises(NotFound) as e:
            store.get(p, art.id)
        # The same answer as an id that never existed.
        with pytest.raises(NotFound) as missing:
            store.get(p, new_id())
        assert e.value.detail.replace(art.id, "X").split("'")[2] == missing.value.detail.split("'")[2]
        assert store.readable_table(p, art.id) is None
    # A mate may read but not manage.
    with pytest.raises(PermissionDenied):
        store.delete(mate, art.id)
    store.share(owner, art.id, "s3", "c1")
    assert store.get(shared_agent, art.id).shares[0].agent == "c1"
    with pytest.raises(NotFound):
        store.get(other_in_s3, art.id)
    with pytest.raises(PermissionDenied):
        store.share(shared_agent, art.id, "s2")  # a reader may not re-share
    store.share(swarm_token, art.id, "s2")
    assert store.get(other, art.id).id == art.id
    store.unshare(admin, art.id, "s2")
    with pytest.raises(NotFound):
        store.get(other, art.id)
    assert [a.id for a in store.list(shared_agent).items] == [art.id]
    assert store.list(other).items == []


def test_invisible_ids_cannot_be_managed(catalog: Catalog) -> None:
    store = catalog.artefacts
    art = save_table(store, who(catalog, "agent", "s1", "a1"))
    other = who(catalog, "swarm", "s2")
    for op in (
        lambda: store.delete(other, art.id),
        lambda: store.share(other, art.id, "s2"),
        lambda: store.extend(other, art.id, 10),
        lambda: store.open_content(other, art.id),
    ):
        with pytest.raises(NotFound):
            op()
    assert files(store) == [art.id] and meta_rows(catalog) == 1
    assert store.get(who(catalog, "admin"), art.id).shares == []


def test_bad_inputs_keep_nothing(catalog: Catalog) -> None:
    store = catalog.artefacts
    p = who(catalog, "agent", "s1", "a1")
    cases = [
        (lambda: store.begin_write(p, "folder", "x"), InvalidArgument),
        (lambda: store.begin_write(p, "table", "", schema=TABLE.schema), InvalidArgument),
        (lambda: store.begin_write(p, "table", "x" * 256, schema=TABLE.schema), InvalidArgument),
        (lambda: store.begin_write(p, "table", "a\x00b", schema=TABLE.schema), InvalidArgument),
        (lambda: store.begin_write(p, "table", "two\nlines", schema=TABLE.schema), InvalidArgument),
        (lambda: store.begin_write(p, "file", "x", tags=["a\tb"]), InvalidArgument),
        (lambda: store.begin_write(p, "table", "x"), InvalidArgument),
        (lambda: store.begin_write(p, "table", "x", schema=TABLE.schema, tags=["t"] * 40), InvalidArgument),
        (lambda: store.begin_write(p, "file", "x", media_type="not a type"), InvalidArgument),
        (lambda: store.begin_write(p, "file", "x", ttl_seconds=0), InvalidArgument),
        (lambda: store.begin_write(p, "file", "x", ttl_seconds=10**9), Unprocessable),
        (lambda: store.begin_write(who(catalog, "metrics"), "file", "x"), PermissionDenied),
    ]
    for fn, exc in cases:
        with pytest.raises(exc) as e:
            fn()
        assert len(e.value.detail) < 700
    assert files(store) == [] and meta_rows(catalog) == 0


def test_schema_change_midway_keeps_nothing(catalog: Catalog) -> None:
    store = catalog.artefacts
    p = who(catalog, "agent", "s1", "a1")
    w = store.begin_write(p, "table", "t", schema=TABLE.schema)
    w.write_table(TABLE)
    with pytest.raises(InvalidArgument, match="schema"):
        w.write_batch(pa.record_batch({"other": [1]}))
    assert files(store) == [] and meta_rows(catalog) == 0
    with pytest.raises(InvalidArgument):
        w.commit()
    assert store.list(p).items == []


def test_quota_refusal_leaves_usage_unchanged(catalog: Catalog) -> None:
    store = catalog.artefacts
    p = who(catalog, "agent", "s1", "a1")
    with store.begin_write(p, "file", "one") as w:
        w.write(b"x" * 150_000)
        w.commit()
    before = store.usage("s1")
    assert before.bytes == 150_000 and before.count == 1
    # Over the swarm's bytes while streaming: refused naming the limit and the usage.
    w = store.begin_write(p, "file", "two")
    w.write(b"x" * 100_000)
    with pytest.raises(PayloadTooLarge) as e:
        w.write(b"x" * 100_000)
    assert "swarm_quota_bytes (300000)" in e.value.detail and "150000 bytes" in e.value.detail
    assert store.usage("s1") == before
    assert len(files(store)) == 1 and meta_rows(catalog) == 1
    # Over the per-upload limit.
    w = store.begin_write(who(catalog, "admin"), "file", "big")
    with pytest.raises(PayloadTooLarge, match="max_upload_bytes"):
        w.write(b"x" * 200_001)
    # Over the count.
    for i in range(4):
        with store.begin_write(p, "file", f"n{i}") as w:
            w.write(b"x")
            w.commit()
    with pytest.raises(PayloadTooLarge, match="swarm_quota_count"):
        store.begin_write(p, "file", "six")
    assert store.usage("s1").count == 5 and len(files(store)) == 5


def test_quota_races_commit_at_most_the_quota(catalog: Catalog) -> None:
    """Eight uploads begun while the swarm keeps nothing commit at once into a count quota of
    five: exactly five are kept (the commit's check runs under the admin-write lock)."""
    store = catalog.artefacts
    p = who(catalog, "agent", "s2", "a1")
    writers = [store.begin_write(p, "file", f"r{i}") for i in range(8)]
    for w in writers:
        w.write(b"y" * 1000)
    results: list[object] = []
    barrier = threading.Barrier(len(writers))

    def commit(w):
        barrier.wait()
        try:
            results.append(w.commit())
        except PayloadTooLarge as e:
            results.append(e)

    threads = [threading.Thread(target=commit, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = [r for r in results if not isinstance(r, Exception)]
    assert len(kept) == 5
    assert all("swarm_quota_count" in str(r) for r in results if isinstance(r, Exception))
    assert store.usage("s2").count == 5 and len(files(store)) == 5 and meta_rows(catalog) == 5


def test_extend_and_expiry(catalog: Catalog) -> None:
    store = catalog.artefacts
    p = who(catalog, "agent", "s1", "a1")
    keep = save_table(store, p, name="keep", ttl_seconds=3600)
    gone = save_table(store, p, name="gone", ttl_seconds=60)
    with pytest.raises(Unprocessable):
        store.extend(p, gone.id, 10**9)
    assert store.get(p, gone.id).expires_at == gone.expires_at
    longer = store.extend(p, keep.id, 7200)
    assert longer.expires_at > keep.expires_at
    report = store.sweep(datetime.now(UTC) + timedelta(seconds=120))
    assert report.expired == [gone.id]
    assert files(store) == [keep.id] and meta_rows(catalog) == 1
    with pytest.raises(NotFound):
        store.get(p, gone.id)
    with catalog.db.reading() as cur, pytest.raises(duckdb.CatalogException):
        cur.sql(f"SELECT * FROM {gone.sql_name}").fetchall()
    assert store.get(p, keep.id).rows == 3
    assert catalog.metrics.artefacts_removed.labels("expired")._value.get() == 1


def test_janitor_removes_orphans_only(catalog: Catalog) -> None:
    store = catalog.artefacts
    p = who(catalog, "agent", "s1", "a1")
    art = save_table(store, p)
    running = store.begin_write(p, "file", "running")
    running.write(b"abc")
    stale = store.directory / f"{TEMP_PREFIX}{new_id()}-dead"
    stale.write_bytes(b"crashed upload")
    orphan = store.directory / new_id()
    orphan.write_bytes(b"content without metadata")
    lost = save_table(store, p, name="lost")
    (store.directory / lost.id).unlink()
    report = store.sweep()
    assert report.temp_files == [stale.name]
    assert report.orphan_content == [orphan.name]
    assert report.orphan_metadata == [lost.id]
    assert sorted(files(store)) == sorted([art.id, running.temp_path.name])
    assert meta_rows(catalog) == 1
    running.write(b"def")
    done = running.commit()
    _, f = store.open_content(p, done.id)
    with f:
        assert f.read() == b"abcdef"


def test_delete_removes_content_metadata_and_sql_copy(catalog: Catalog) -> None:
    store = catalog.artefacts
    p = who(catalog, "agent", "s1", "a1")
    art = save_table(store, p)
    store.delete(p, art.id)
    assert files(store) == [] and meta_rows(catalog) == 0
    with pytest.raises(NotFound):
        store.delete(p, art.id)
    assert store.readable_table(who(catalog, "admin"), art.id) is None


def test_sql_copies_are_not_data_tables(catalog: Catalog) -> None:
    save_table(catalog.artefacts, who(catalog, "agent", "s1", "a1"))
    assert all(r.schema != "artefacts" for r in catalog.tables.list_refs())
    with pytest.raises(InvalidArgument, match="artefacts"):
        catalog.swarms.set_allowlist("s1", ["artefacts.*"])


def test_list_pages_and_filters(catalog: Catalog) -> None:
    store = catalog.artefacts
    p = who(catalog, "admin")
    made = [save_table(store, p, name=f"t{i}", tags=["even" if i % 2 == 0 else "odd"]) for i in range(5)]
    page = store.list(p, page_size=2)
    ids = [a.id for a in page.items]
    while page.next:
        page = store.list(p, page_size=2, after=page.next)
        ids += [a.id for a in page.items]
    assert ids == [a.id for a in made]
    assert [a.name for a in store.list(p, ArtefactFilter(tag="odd")).items] == ["t1", "t3"]
    assert len(store.list(p, ArtefactFilter(owner=p.label, kind="table")).items) == 5
    assert store.list(p, ArtefactFilter(owner="agent:s1/a1")).items == []
    with pytest.raises(InvalidArgument):
        store.list(p, page_size=0)
    with pytest.raises(InvalidArgument):
        store.list(p, after="../x")


def test_content_on_disk_is_an_ipc_file(catalog: Catalog) -> None:
    art = save_table(catalog.artefacts, who(catalog, "admin"))
    with pa.memory_map(str(catalog.artefacts.directory / art.id)) as src:
        assert ipc.open_file(src).read_all().equals(TABLE)


def test_backup_holds_content_of_exactly_the_committed_artefacts(tmp_path: Path) -> None:
    from catalog.backup import create_snapshot, restore_snapshot

    config = make_config(tmp_path / "data")
    c = Catalog(config)
    c.swarms.create("s1")
    p = who(c, "agent", "s1", "a1")
    kept = save_table(c.artefacts, p, name="kept")
    running = c.artefacts.begin_write(p, "file", "half")
    running.write(b"half an upload")
    (c.artefacts.directory / new_id()).write_bytes(b"orphan content")
    info = create_snapshot(c, tmp_path / "backups")
    running.abort()
    gone = save_table(c.artefacts, p, name="after the backup")
    c.close()
    restore_snapshot(config, Path(info.path))
    c = Catalog(config)
    try:
        assert files(c.artefacts) == [kept.id]
        _, reader = c.artefacts.open_table(p, kept.id)
        assert reader.read_all().equals(TABLE)
        with pytest.raises(NotFound):
            c.artefacts.get(p, gone.id)
        assert c.artefacts.sweep().total == 0
    finally:
        c.close()


def test_janitor_drops_sql_copies_without_metadata(catalog: Catalog) -> None:
    store = catalog.artefacts
    p = who(catalog, "agent", "s1", "a1")
    art = save_table(store, p)
    stray = new_id()
    with catalog.db.transaction() as cur:
        cur.execute(f'CREATE TABLE artefacts."{stray}" AS SELECT 1 AS x')
    running = store.begin_write(p, "table", "running", schema=TABLE.schema)
    running.write_table(TABLE)
    with catalog.db.transaction() as cur:  # a writer between its SQL copy and its commit
        cur.execute(f'CREATE TABLE artefacts."{running.id}" AS SELECT 1 AS x')
    report = store.sweep()
    assert report.orphan_tables == [stray]
    with catalog.db.reading() as cur:
        names = cur.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'artefacts'"
        ).fetchall()
    assert sorted(n for (n,) in names) == sorted([art.id, running.id])
    running.abort()


def test_failed_commit_drops_its_sql_copy(catalog: Catalog) -> None:
    """An upload refused at commit (the quota filled meanwhile) leaves no SQL table behind."""
    store = catalog.artefacts
    p = who(catalog, "agent", "s3", "a1")
    w = store.begin_write(p, "table", "late", schema=TABLE.schema)
    w.write_table(TABLE)
    for i in range(5):  # fill the count quota while w is open
        with store.begin_write(p, "file", f"f{i}") as f:
            f.write(b"x")
            f.commit()
    with pytest.raises(PayloadTooLarge, match="swarm_quota_count"):
        w.commit()
    with catalog.db.reading() as cur:
        assert cur.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'artefacts'"
        ).fetchall() == [(0,)]
    assert [n for n in files(store) if n.startswith(TEMP_PREFIX)] == []


def test_ids_are_case_insensitive_and_usage_skips_expired(catalog: Catalog) -> None:
    store = catalog.artefacts
    p = who(catalog, "agent", "s1", "a1")
    art = save_table(store, p, ttl_seconds=1)
    assert store.get(p, art.id.upper()).id == art.id
    assert store.usage("s1").bytes == art.size_bytes
    wait_until(lambda: datetime.now(UTC) >= art.expires_at, what="the artefact's expiry")
    assert store.usage("s1").bytes == 0


def test_a_recreated_swarm_neither_sees_nor_pays_for_the_old_ones_artefacts(catalog: Catalog) -> None:
    store = catalog.artefacts
    old = who(catalog, "agent", "s2", "a1")
    art = save_table(store, old)
    assert store.usage("s2").count == 1
    catalog.delete_swarm("s2")
    catalog.swarms.create("s2")
    new = who(catalog, "agent", "s2", "a1")
    with pytest.raises(NotFound):
        store.get(new, art.id)
    assert store.readable_table(new, art.id) is None
    assert store.usage("s2").count == 0
    assert store.get(who(catalog, "admin"), art.id).id == art.id


def test_running_uploads_count_against_the_quota_while_streaming(catalog: Catalog) -> None:
    """Parallel uploads of one swarm cannot each fill the disk up to the quota."""
    store = catalog.artefacts
    p = who(catalog, "agent", "s1", "a1")
    first = store.begin_write(p, "file", "first")
    first.write(b"x" * 200_000)
    second = store.begin_write(p, "file", "second")
    with pytest.raises(PayloadTooLarge) as e:
        second.write(b"x" * 150_000)
    assert "other uploads in progress hold 200000 more" in e.value.detail
    assert [n for n in files(store) if n.startswith(TEMP_PREFIX)] == [first.temp_path.name]
    first.abort()
    with store.begin_write(p, "file", "third") as third:
        third.write(b"x" * 150_000)
        third.commit()
    assert store.usage("s1").bytes == 150_000


def test_status_section(catalog: Catalog) -> None:
    save_table(catalog.artefacts, who(catalog, "admin"))
    section = catalog.artefacts.status()
    assert (section.count, section.tables, section.uploading) == (1, 1, 0) and section.bytes > 0


def test_config_reserves_the_artefacts_schema_and_bounds_ttls() -> None:
    from catalog import ConfigError, load_config

    sync: dict[str, Any] = {
        "snowflake": {"account": "acme", "user": "quiver", "password": "x"},
        "sync": {"tables": [{"source": "DB.S.T", "target": "artefacts.t"}]},
    }
    with pytest.raises(ConfigError, match="reserved for tabular artefacts"):
        load_config(None, environ={}, overrides=sync)
    with pytest.raises(ConfigError, match=r"artefacts\.default_ttl_seconds"):
        load_config(
            None, environ={}, overrides={"artefacts": {"default_ttl_seconds": 10, "max_ttl_seconds": 5}}
        )
    env = {"QUIVER_ARTEFACTS_SWARM_QUOTA_COUNT": "7"}
    assert load_config(None, environ=env).artefacts.swarm_quota_count == 7


def test_any_name_is_a_label_or_a_clear_refusal(catalog: Catalog) -> None:
    """Hypothesis over names (path-like, unicode, control characters, long): either refused
    with INVALID_ARGUMENT and nothing kept, or stored verbatim with the content under the id."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    store = catalog.artefacts
    p = who(catalog, "admin")
    names = st.one_of(
        st.text(max_size=300),
        st.sampled_from(
            ["../../etc/passwd", "/abs/path", "..", ".", "a/../../b", "C:\\\\x", "~root", ".tmp-x"]
        ),
    )

    @settings(max_examples=150, deadline=None)
    @given(name=names)
    def check(name: str) -> None:
        before = files(store)
        try:
            with store.begin_write(p, "file", name) as w:
                w.write(b"content")
                art = w.commit()
        except InvalidArgument as e:
            assert len(e.detail) <= 600
            assert files(store) == before
            return
        assert art.name == name and files(store) == sorted([*before, art.id])
        store.delete(p, art.id)
        assert files(store) == before

    check()
    assert not (catalog.data_dir.parent / "etc").exists() and not (store.directory.parent / "b").exists()


def test_uploads_racing_the_janitor_all_commit_whole(catalog: Catalog) -> None:
    """Writers (threads) save tables and files while the janitor sweeps without pause: every
    upload commits, reads back whole, and nothing of theirs is taken for an orphan."""
    store = catalog.artefacts
    admin = who(catalog, "admin")
    stop = threading.Event()
    sweeps = [0]
    errors: list[BaseException] = []

    def janitor() -> None:
        while not stop.is_set():
            report = store.sweep()
            if report.total:
                errors.append(AssertionError(f"the janitor removed a live upload's files: {report}"))
            sweeps[0] += 1

    def writer(n: int) -> None:
        try:
            for i in range(15):
                if i % 2:
                    art = save_table(store, admin, name=f"w{n}-{i}")
                    _, reader = store.open_table(admin, art.id)
                    assert reader.read_all().equals(TABLE)
                else:
                    with store.begin_write(admin, "file", f"w{n}-{i}") as w:
                        w.write(b"%d" % i)
                        art = w.commit()
                    _, f = store.open_content(admin, art.id)
                    with f:
                        assert f.read() == b"%d" % i
        except BaseException as e:
            errors.append(e)

    sweeper = threading.Thread(target=janitor)
    sweeper.start()
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sweeper.join()
    assert not errors, errors
    assert sweeps[0] > 0 and meta_rows(catalog) == 60 and len(files(store)) == 60


def _state(c: Catalog) -> dict[str, Any]:
    """Everything the store keeps: content files, metadata and share rows, SQL copies."""
    with c.db.reading() as cur:
        rows = cur.execute(f"SELECT id, expires_at FROM {SYSTEM_SCHEMA}.artefacts ORDER BY id").fetchall()
        shares = cur.execute(
            f"SELECT artefact_id, swarm, agent FROM {SYSTEM_SCHEMA}.artefact_shares ORDER BY ALL"
        ).fetchall()
        tables = cur.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'artefacts' ORDER BY 1"
        ).fetchall()
    return {"files": files(c.artefacts), "rows": rows, "shares": shares, "tables": tables}


def test_an_expired_artefact_is_gone_at_once_and_the_sweep_removes_only_it(catalog: Catalog) -> None:
    """Past its expiry an artefact is NOT_FOUND for every read and every write, before any
    janitor pass (here there is no janitor thread: nothing changes until sweep), and counts
    no more; the sweep then removes its content, metadata, shares and SQL copy — and nothing
    of the artefacts that live."""
    store = catalog.artefacts
    owner = who(catalog, "agent", "s1", "a1")
    readers = [
        owner,
        who(catalog, "agent", "s1", "a2"),
        who(catalog, "agent", "s2", "b1"),
        who(catalog, "admin"),
    ]
    keep = save_table(store, owner, name="keep", ttl_seconds=3600)
    gone = save_table(store, owner, name="gone", ttl_seconds=1)
    with store.begin_write(owner, "file", "gone too", ttl_seconds=1) as w:
        w.write(b"short-lived")
        gone_file = w.commit()
    theirs = save_table(store, who(catalog, "agent", "s3", "c1"), name="theirs", ttl_seconds=3600)
    for art in (keep, gone):
        store.share(owner, art.id, "s2")
    wait_until(lambda: datetime.now(UTC) > max(gone.expires_at, gone_file.expires_at), what="the expiry")
    before = _state(catalog)
    for p in readers:
        for aid in (gone.id, gone_file.id):
            for op, args in (
                (store.get, ()),
                (store.open_content, ()),
                (store.content_path, ()),
                (store.delete, ()),
                (store.share, ("s3",)),
                (store.unshare, ("s2",)),
                (store.extend, (3600,)),  # an expired artefact cannot be revived
            ):
                with pytest.raises(NotFound) as e:
                    op(p, aid, *args)
                assert e.value.detail == f"artefact {aid!r} not found (or not visible to you)"
        with pytest.raises(NotFound):
            store.open_table(p, gone.id)
        with pytest.raises(NotFound):
            store.table_schema(p, gone.id)
        assert store.readable_table(p, gone.id) is None
        assert {gone.id, gone_file.id}.isdisjoint(a.id for a in store.list(p).items)
    assert store.readable_table(readers[1], keep.id) is not None
    assert _state(catalog) == before  # refused, not removed: that is the janitor's
    assert (store.usage("s1").bytes, store.usage("s1").count) == (keep.size_bytes, 1)
    assert store.status().count == 4  # kept until the janitor's pass

    report = store.sweep()
    assert report.expired == sorted([gone.id, gone_file.id]) and report.total == 2
    after = _state(catalog)
    assert after["files"] == sorted([keep.id, theirs.id])
    assert [r[0] for r in after["rows"]] == sorted([keep.id, theirs.id])
    assert after["shares"] == [(keep.id, "s2", None)]
    assert after["tables"] == sorted([(keep.id,), (theirs.id,)])
    assert [r for r in before["rows"] if r[0] in (keep.id, theirs.id)] == after["rows"]
    _, reader = store.open_table(readers[2], keep.id)
    assert reader.read_all().equals(TABLE)
    assert store.get(who(catalog, "agent", "s3", "c2"), theirs.id).id == theirs.id
    assert store.sweep().total == 0


@pytest.mark.parametrize("op", ["extend", "share", "unshare", "delete"])
def test_a_write_that_waited_past_the_expiry_does_not_revive_it(catalog: Catalog, op: str) -> None:
    """A write checked while the artefact was live, then held at the admin-write lock (another
    admin write, here the test) until it expired, is NOT_FOUND: an expired artefact is never
    extended back to life, re-shared or counted as deleted by its owner."""
    store = catalog.artefacts
    owner = who(catalog, "agent", "s1", "a1")
    art = save_table(store, owner, name=f"racing {op}", ttl_seconds=1)
    if op == "unshare":
        store.share(owner, art.id, "s2")
    calls: dict[str, Callable[[], object]] = {
        "extend": lambda: store.extend(owner, art.id, 3600),
        "share": lambda: store.share(owner, art.id, "s3"),
        "unshare": lambda: store.unshare(owner, art.id, "s2"),
        "delete": lambda: store.delete(owner, art.id),
    }
    outcome: list[object] = []

    def write() -> None:
        try:
            outcome.append(calls[op]())
        except NotFound as e:
            outcome.append(e)

    with store.writes.lock:
        writer = threading.Thread(target=write)
        writer.start()
        wait_until(lambda: datetime.now(UTC) > art.expires_at, what="the expiry")
    writer.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], NotFound), outcome
    with pytest.raises(NotFound):
        store.get(who(catalog, "admin"), art.id)
    report = store.sweep()
    assert report.expired == [art.id]
