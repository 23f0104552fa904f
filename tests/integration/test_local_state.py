"""All local state in one place: PostgreSQL's cluster outside a state folder its user
cannot reach, the leftover of a deleted state folder, and `down --purge`. Runs initdb on
a temporary state folder; starts no server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cluster.processes import ServiceFailed
from cluster.settings import load_settings
from cluster.stack import PG_POINTER, LocalStack

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="PostgreSQL's cluster leaves the state folder only when the stack runs as root",
)


def test_a_cluster_left_by_a_deleted_state_folder_is_removed_and_purge_removes_all(
    tmp_path: Path,
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # like /root: the postgres user cannot get in
    state = private / "state"
    said: list[str] = []
    stack = LocalStack(load_settings(paths={"state_dir": state}), said.append)
    root = stack._pg_root()
    try:
        assert root.parent == Path("/var/tmp")
        stack.prepare_postgres(fresh=True)
        assert (root / "data" / "PG_VERSION").exists()
        assert (state / PG_POINTER).read_text().strip() == str(root)
        old = root / "data" / "from-the-first-state-folder"
        old.touch()
        stack.prepare_postgres(fresh=False)  # its own state folder: kept
        assert old.exists()

        shutil.rmtree(state)  # what the user did
        (root / "data" / "postmaster.pid").write_text(f"{os.getpid()}\n/ignored\n")
        with pytest.raises(ServiceFailed, match=r"still runs on .*kill -INT"):
            stack.prepare_postgres(fresh=True)  # never deleted from under a live server
        assert old.exists()
        (root / "data" / "postmaster.pid").unlink()

        stack.prepare_postgres(fresh=True)
        assert not old.exists()
        assert (root / "data" / "PG_VERSION").exists()  # a new cluster
        assert any(f"removing the PostgreSQL cluster in {root}" in m for m in said), said
        assert stack.local_state()["outside"] == [str(root)]

        assert set(stack.purge()) == {root, state}
        assert not root.exists()
        assert not state.exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)
