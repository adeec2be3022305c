"""Helpers for tests of the ``quiver`` commands that reach a running server: a TOML file for
the command (the server's settings plus the port it really listens on), and the command run
in-process or as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.harness import DEMO_SCALE

ROOT = Path(__file__).resolve().parent.parent


def write_toml(path: Path, sections: dict[str, Any]) -> Path:
    """A TOML file from ``{"server": {...}, "tls": {...}, "sync": {"tables": [{...}]}}``:
    a list of tables becomes ``[[section.key]]`` blocks. Values are strings, numbers,
    booleans or lists of those (JSON's spelling of them is TOML's)."""
    lines: list[str] = []
    for name, values in sections.items():
        arrays = {k: v for k, v in values.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if k not in arrays]
        for key, items in arrays.items():
            for item in items:
                lines.append(f"[[{name}.{key}]]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def run_quiver(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m quiver ...`` as an operator runs it."""
    env = {**os.environ, "QUIVER_DEMO_SCALE": str(DEMO_SCALE), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "quiver", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


def cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """``quiver.cli.main(argv)`` in this process: (exit code, stdout, stderr). The logging
    configuration the command installs (its own stderr) is undone afterwards, so the servers
    of the test keep logging where they did; the lines it queued are written first."""
    import structlog

    from quiver import logs
    from quiver.cli import main

    capsys.readouterr()  # what the servers logged before
    saved = structlog.get_config()
    try:
        code = main(list(argv))
    finally:
        logs.flush()  # the command's lines, which its log writer thread writes (quiver/logs.py)
        structlog.configure(**saved)
    out, err = capsys.readouterr()
    return code, out, err


def json_out(out: str) -> Any:
    """The JSON document a ``--json`` command printed (a server thread may have logged a line
    to stdout before the command switched logging to stderr)."""
    start = (
        0 if out.startswith(("{", "[")) else min(i + 1 for i in (out.find("\n{"), out.find("\n[")) if i >= 0)
    )
    return json.loads(out[start:])


def error_lines(err: str) -> list[str]:
    """The command's own messages on stderr (``quiver: ...``), without log lines."""
    return [line for line in err.splitlines() if line.startswith("quiver")]
