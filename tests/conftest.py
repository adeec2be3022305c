from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import FakeClock, Server, start_server
from tests.sync_emulator import Emulator, emulator_in_process


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One demo server per test module (tests that change state use unique names)."""
    s = start_server(tmp_path_factory.mktemp("quiver"))
    yield s
    s.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Server]:
    """A server of its own, for tests that restart it or need pristine state."""
    s = start_server(tmp_path / "data")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    """The clock of :func:`clocked_server`: advance it to expire tokens and tickets."""
    return FakeClock()


@pytest.fixture(scope="module")
def clocked_server(tmp_path_factory: pytest.TempPathFactory, clock: FakeClock) -> Iterator[Server]:
    """A demo server whose token and ticket expiry read ``clock`` (one per module; tests
    mint their own tokens, and move the clock only forward)."""
    s = start_server(tmp_path_factory.mktemp("clocked"), clock=clock, tokens={"leeway_seconds": 5})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    """A Snowflake emulator (fakesnow's server, in-process) per sync test module."""
    with emulator_in_process() as e:
        yield e
