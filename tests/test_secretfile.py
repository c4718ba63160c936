"""``NAME`` or ``NAME_FILE``: one reader for every setting that may be a mounted secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.errors import ConfigError
from bridge.secretfile import read_setting

SECRET = "s3cr3t-VALUE"


def test_direct_value_and_file_value(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(f"  {SECRET}\n")
    assert read_setting({"X": SECRET}, "X") == SECRET
    assert read_setting({"X_FILE": str(path)}, "X") == SECRET
    assert read_setting({}, "X") is None
    assert read_setting({"X": "  "}, "X") is None


def test_file_variant_is_ignored_where_not_allowed(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET)
    assert read_setting({"X_FILE": str(path)}, "X", from_file=False) is None


def test_both_set_is_an_error_naming_the_variables_only(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET)
    with pytest.raises(ConfigError, match="set either X or X_FILE") as info:
        read_setting({"X": SECRET, "X_FILE": str(path)}, "X")
    assert SECRET not in str(info.value)


def test_unreadable_file_names_the_path_never_the_content(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="X_FILE: cannot read") as info:
        read_setting({"X_FILE": str(tmp_path / "missing")}, "X")
    assert "missing" in str(info.value)
