"""The one listing of published versions: newest first, complete ones only, odd names ignored."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from contract.signatures import SAVED_MODEL_FILE
from contract.versions import latest_version, published_versions, version_directories, version_number


def make_version(model_dir: Path, name: str, *, complete: bool = True) -> None:
    (model_dir / name).mkdir(parents=True)
    if complete:
        (model_dir / name / SAVED_MODEL_FILE).write_bytes(b"x")


def test_latest_version_skips_incomplete_and_hidden_directories(tmp_path: Path) -> None:
    model_dir = tmp_path / "cifar10"
    assert latest_version(model_dir) is None
    for name in ("3", "10", ".tmp-11-123", "abc"):
        make_version(model_dir, name)
    # 12 has no saved_model.pb (still being written by a non-atomic publisher); .tmp-11 is staging.
    make_version(model_dir, "12", complete=False)
    assert latest_version(model_dir) == 10


def test_newest_first_in_numeric_not_name_order(tmp_path: Path) -> None:
    for name in ("2", "10", "1", "9"):
        make_version(tmp_path, name)
    assert published_versions(tmp_path) == [10, 9, 2, 1]
    assert latest_version(tmp_path) == 10


def test_a_version_needs_its_saved_model(tmp_path: Path) -> None:
    make_version(tmp_path, "1")
    make_version(tmp_path, "2", complete=False)
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "variables").mkdir()  # the rest of a SavedModel, without its graph
    assert published_versions(tmp_path) == [1]
    # The directories still take their numbers: the publisher must not reuse them.
    assert version_directories(tmp_path) == [3, 2, 1]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("1", 1),
        ("42", 42),
        ("0", None),  # versions start at 1
        ("007", None),  # not the directory of version 7 (`model_dir / "7"`), so not a version at all
        ("²", None),  # str.isdigit() is True, int() raises
        ("١٢", None),  # Arabic-Indic digits: int() would accept them, TF Serving would not
        ("-1", None),
        ("+1", None),
        (" 1", None),
        ("1.0", None),
        ("3.partial", None),
        (".tmp-3-123", None),
        ("", None),
    ],
)
def test_version_number_of_a_directory_name(name: str, expected: int | None) -> None:
    assert version_number(name) == expected


def test_odd_names_are_ignored_not_fatal(tmp_path: Path) -> None:
    for name in ("²", "007", "0", "١٢", "5"):
        make_version(tmp_path, name)
    assert published_versions(tmp_path) == [5]
    assert version_directories(tmp_path) == [5]


def test_files_with_version_names_are_not_versions(tmp_path: Path) -> None:
    make_version(tmp_path, "1")
    (tmp_path / "2").write_bytes(b"a file, not a directory")
    (tmp_path / ".last-version").write_text("7\n")
    assert published_versions(tmp_path) == [1]
    assert version_directories(tmp_path) == [1]


def test_a_missing_or_non_directory_model_dir_has_no_versions(tmp_path: Path) -> None:
    assert published_versions(tmp_path / "missing") == []
    assert version_directories(tmp_path / "missing") == []
    assert latest_version(tmp_path / "missing") is None
    (tmp_path / "file").write_bytes(b"x")
    assert published_versions(tmp_path / "file") == []
    assert latest_version(tmp_path / "file") is None


def test_odd_names_are_warned_about_once_each_and_hidden_names_not_at_all(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("²", "007", "tmp-xyz", "5", ".tmp-6-ab12", ".trash-4-cd34"):
        make_version(tmp_path, name)
    (tmp_path / "3").write_bytes(b"a file")
    (tmp_path / ".last-version").write_text("6\n")
    caplog.set_level(logging.WARNING, logger="contract.versions")
    for _ in range(3):  # the gateway and the TF Serving double list versions on every poll
        assert published_versions(tmp_path) == [5]
    warnings = [r.getMessage() for r in caplog.records if r.name == "contract.versions"]
    assert len(warnings) == 4, warnings
    odd = ("²", "007", "tmp-xyz", "3")
    by_name = {name: [w for w in warnings if f"ignoring {name!r}" in w] for name in odd}
    assert all(len(found) == 1 for found in by_name.values()), by_name
    assert "TF Serving would still load it as version 7; rename it to '7'" in by_name["007"][0]
    assert "a file, not a version directory" in by_name["3"][0]
    assert all(str(tmp_path) in w and "hide it with a leading '.'" in w for w in warnings)
