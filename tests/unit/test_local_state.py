"""Where the local stack keeps its state, and `rayline down --purge` deleting all of it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.settings import PROJECT_ROOT, load_settings
from cluster.stack import LocalStack
from core.exceptions import ConfigurationError


def stack_in(state: Path) -> LocalStack:
    return LocalStack(load_settings(paths={"state_dir": state}))


def outside(state: Path, kind: str, parent: str) -> Path:
    digest = hashlib.sha256(str(state).encode()).hexdigest()[:12]
    return Path(parent) / f"rayline-{kind}-{digest}"


@pytest.mark.parametrize(
    "state", [Path("/"), Path.home(), PROJECT_ROOT, PROJECT_ROOT.parent, Path.home() / ".."]
)
def test_purge_refuses_a_state_folder_that_holds_other_things(state: Path) -> None:
    with pytest.raises(ConfigurationError, match="must be a folder of its own"):
        stack_in(state).purge()


def test_purge_deletes_the_state_folder_and_its_folders_outside(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "kafka" / "data").mkdir(parents=True)
    postgres, ray = outside(state, "postgres", "/var/tmp"), outside(state, "ray", "/tmp")
    (postgres / "data").mkdir(parents=True)
    ray.mkdir()
    unrelated = tmp_path / "other"
    unrelated.mkdir()
    stack = stack_in(state)
    assert stack.local_state() == {"folder": str(state), "outside": [str(postgres), str(ray)]}
    assert set(stack.purge()) == {state, postgres, ray}
    assert [p for p in (state, postgres, ray) if p.exists()] == []
    assert unrelated.exists()
    assert stack.purge() == []  # nothing left: nothing to do


def test_purge_finds_a_cluster_outside_after_the_state_folder_was_deleted(
    tmp_path: Path,
) -> None:
    # `rm -rf .state` left PostgreSQL's cluster in /var/tmp: purge still finds it.
    state = tmp_path / "gone"
    postgres = outside(state, "postgres", "/var/tmp")
    (postgres / "data").mkdir(parents=True)
    assert stack_in(state).purge() == [postgres]
    assert not postgres.exists()


def test_ray_keeps_its_temp_folder_in_the_state_folder_unless_the_path_is_too_long() -> None:
    short = Path("/srv/rl/.state")
    spec = stack_in(short)._ray_spec()
    assert spec.argv[spec.argv.index("--temp-dir") + 1] == "/srv/rl/.state/ray"
    long = Path("/home/someone/projects/analytics/rayline-clone/.state")
    spec = stack_in(long)._ray_spec()
    # Ray's session sockets must fit in AF_UNIX's 107 bytes.
    assert spec.argv[spec.argv.index("--temp-dir") + 1] == str(outside(long, "ray", "/tmp"))


def test_down_purge_is_documented_in_its_help() -> None:
    result = CliRunner().invoke(app, ["down", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "--purge" in result.output
    assert "/var/tmp" in result.output
