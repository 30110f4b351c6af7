"""Settings and tables read as plain values: YAML (no tags, anchors, aliases or dates), JSON
and CSV, each capped in size before it is parsed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from transfer_learning.readers.files import (
    SETTINGS_LIMIT,
    SUMMARY_LIMIT,
    UntrustedFileError,
    read_regular,
    read_text,
)
from transfer_learning.readers.plain import plain_or_refused

_NO_DEFAULT: Any = object()


# -- YAML ----------------------------------------------------------------------------------


def _yaml_loader() -> type:
    import yaml

    class PlainLoader(yaml.SafeLoader):
        """SafeLoader without anchors, aliases, explicit tags or dates."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            mark = f"line {event.start_mark.line + 1}"
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.YAMLError(f"a YAML anchor or alias (&name / *name) at {mark}")
            tag = getattr(event, "tag", None)
            if tag not in (None, "!"):
                raise yaml.YAMLError(f"the YAML tag {tag} at {mark}")
            return super().compose_node(parent, index)

    PlainLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return PlainLoader


def read_yaml(
    path: Path | str, *, fix: str, limit: int = SETTINGS_LIMIT, interpolations: bool = False
) -> Any:
    """The plain values of a YAML file; ``fix`` ends every refusal (what the user can do)."""
    import yaml

    path = Path(path)
    text = read_text(path, limit, fix)
    try:
        loaded = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise UntrustedFileError(
            f"refusing {path}: it holds {detail[:300]}, not plain settings. {fix}"
        ) from None
    except RecursionError:
        raise UntrustedFileError(f"refusing {path}: nested too deep. {fix}".rstrip()) from None
    plain_or_refused(loaded, path, fix, interpolations=interpolations)
    return loaded


def read_string_list(path: Path | str, *, fix: str) -> list[str]:
    """A YAML list of strings (a run's saved command-line settings); empty for an empty file."""
    loaded = read_yaml(path, fix=fix, interpolations=True)  # each string is judged as a setting
    if loaded is None:
        return []
    if not isinstance(loaded, list) or not all(isinstance(o, str) for o in loaded):
        raise UntrustedFileError(f"refusing {path}: it is not a list of settings. {fix}".rstrip())
    return loaded


def read_config(path: Path | str, *, fix: str) -> dict[str, Any]:
    """A YAML mapping of plain settings (``run_config.yaml``), with no interpolation in it."""
    loaded = read_yaml(path, fix=fix)
    if not isinstance(loaded, dict):
        raise UntrustedFileError(f"refusing {path}: it holds no mapping of settings. {fix}".rstrip())
    return loaded


# -- JSON ----------------------------------------------------------------------------------


def read_json(path: Path | str, *, fix: str, limit: int = SETTINGS_LIMIT) -> Any:
    """The plain values of a JSON file (size capped before parsing, nesting bounded)."""
    path = Path(path)
    text = read_text(path, limit, fix)
    try:
        loaded = json.loads(text)
    except ValueError as exc:
        raise UntrustedFileError(f"cannot read {path}: not JSON ({exc}). {fix}".rstrip()) from None
    except RecursionError:
        raise UntrustedFileError(f"refusing {path}: nested too deep. {fix}".rstrip()) from None
    plain_or_refused(loaded, path, fix)
    return loaded


def json_field(path: Path | str, key: str, *, fix: str, default: Any = _NO_DEFAULT) -> Any:
    """One field of a JSON object file; ``default`` when the file or the field is missing."""
    path = Path(path)
    if default is not _NO_DEFAULT and not path.is_file():
        return default
    data = read_json(path, fix=fix)
    if not isinstance(data, dict):
        raise UntrustedFileError(f"refusing {path}: it is not a JSON object. {fix}".rstrip())
    if key not in data and default is _NO_DEFAULT:
        raise UntrustedFileError(f"refusing {path}: it has no {key!r} field. {fix}".rstrip())
    return data.get(key, default)


# -- CSV -----------------------------------------------------------------------------------


def read_csv_rows(path: Path | str, limit: int | None = None) -> list[list[str]]:
    """Every row of a CSV file, as text cells (a BOM dropped). ``UnicodeDecodeError`` and
    ``csv.Error`` reach the caller, which knows what the file was for."""
    text = read_regular(path, limit).decode("utf-8-sig")
    return list(csv.reader(io.StringIO(text, newline="")))


def read_csv_records(
    path: Path | str, limit: int | None = SUMMARY_LIMIT
) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows (as header -> cell) of a CSV file; ``([], [])`` without one."""
    if not Path(path).is_file():
        return [], []
    reader = csv.DictReader(io.StringIO(read_regular(path, limit).decode("utf-8-sig"), newline=""))
    rows = list(reader)
    return list(reader.fieldnames or []), rows
