"""Embedded PostgreSQL setup: the guard against loosening private directories as root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segments_service.database import DatabaseSetupError, _untraversable_parents, start_embedded


def test_missing_directories_are_not_a_problem(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet" / "there"
    blocked = _untraversable_parents(target)
    assert tmp_path / "not" not in blocked
    assert tmp_path / "not" / "yet" not in blocked
    assert all(p.exists() for p in blocked)


def test_private_parent_is_named(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert private in _untraversable_parents(private / "data" / "postgres")


@pytest.mark.skipif(os.geteuid() != 0, reason="the guard applies when running as root")
def test_root_refuses_private_data_dir_without_touching_it(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(DatabaseSetupError, match="cannot enter"):
        start_embedded(private / "data")
    assert private.stat().st_mode & 0o777 == 0o700
    assert not (private / "data").exists()
