"""The one reader of settings that may come from a file: ``NAME`` or ``NAME_FILE`` (Docker/Kubernetes secrets)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from bridge.errors import ConfigError


def read_setting(environ: Mapping[str, str], name: str, *, from_file: bool = True) -> str | None:
    """The value of ``name``, or (with ``from_file``) the stripped content of the file named by ``name_FILE``.

    Unset and empty both mean ``None``. Setting both ``name`` and ``name_FILE`` is a :class:`ConfigError`, as is
    an unreadable file; messages name the variable and the path, never the content.
    """
    direct = environ.get(name, "").strip()
    file_name = environ.get(f"{name}_FILE", "").strip() if from_file else ""
    if direct and file_name:
        raise ConfigError(f"set either {name} or {name}_FILE, not both")
    if not file_name:
        return direct or None
    try:
        return Path(file_name).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{name}_FILE: cannot read {file_name!r}: {reason}") from None
