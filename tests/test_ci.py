"""The CI/CD pipeline's own rules, which actionlint does not check (it checks that the
workflows are valid; ``make lint`` runs it):

- every action is pinned to a full commit SHA, so a moved tag cannot change what runs
  with the release's ``packages: write`` token or the deploy secrets;
- a secret never appears inside a ``run:`` script (where it could be echoed, or be split
  by the shell): it reaches a step only through ``env:`` or ``with:``;
- deploys run in a GitHub environment (its protection rules and secrets) and are never
  cancelled half-way;
- ``.pre-commit-config.yaml`` runs exactly the commands of ``make lint``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
SHA_PIN = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+@[0-9a-f]{40}$")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def _steps(workflow: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for job_id, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            yield job_id, step


def test_the_three_workflows_exist() -> None:
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "release.yml", "deploy.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_actions_are_pinned_to_a_commit(path: Path) -> None:
    unpinned = [
        f"{job}: {step['uses']}"
        for job, step in _steps(_load(path))
        if "uses" in step and not step["uses"].startswith("./") and not SHA_PIN.match(step["uses"])
    ]
    assert unpinned == []
    # The version each SHA stands for is written beside it, for the next upgrade.
    for line in path.read_text().splitlines():
        if re.search(r"uses: [^.].*@[0-9a-f]{40}", line):
            assert re.search(r"# v\d+\.\d+\.\d+$", line), line


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_secrets_never_appear_in_scripts(path: Path) -> None:
    inline = [
        f"{job}: {step.get('name', step['run'][:40])}"
        for job, step in _steps(_load(path))
        if "run" in step and re.search(r"\$\{\{[^}]*\b(secrets|github\.token)\b", step["run"])
    ]
    assert inline == []


def test_deploys_are_protected_and_never_cancelled() -> None:
    deploy = _load(ROOT / ".github" / "workflows" / "deploy.yml")
    for job in deploy["jobs"].values():
        assert "production" in str(job["environment"]["name"])
        assert job["concurrency"]["cancel-in-progress"] is False
    # The secret files are removed whatever the outcome of the steps before.
    steps = [step for _, step in _steps(deploy)]
    cleanup = [s for s in steps if "SECRETS_DIR" in s.get("run", "") and "rm -rf" in s["run"]]
    assert len(cleanup) == 1 and cleanup[0].get("if") == "always()" and cleanup[0] is steps[-1]


def test_release_writes_only_from_the_publish_job() -> None:
    release = _load(ROOT / ".github" / "workflows" / "release.yml")
    assert release["permissions"] == {"contents": "read"}
    assert release["jobs"]["publish"]["needs"] == "ci"
    assert release["jobs"]["publish"]["permissions"] == {"contents": "write", "packages": "write"}


def _make_lint_commands() -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe, "no lint target in the Makefile"
    # pre-commit passes the files itself: the recipe's "." is not part of the command.
    commands = [line.strip().replace("$(BIN)/", ".venv/bin/") for line in recipe.group(1).splitlines()]
    return [command.removesuffix(" .") for command in commands]


def test_pre_commit_runs_what_make_lint_runs() -> None:
    config = _load(ROOT / ".pre-commit-config.yaml")
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    assert {repo["repo"] for repo in config["repos"]} == {"local"}  # nothing to download
    assert {hook["language"] for hook in hooks} == {"system"}
    entries = [hook["entry"].replace(" --force-exclude", "") for hook in hooks]
    assert entries == _make_lint_commands()
