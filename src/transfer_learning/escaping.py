"""Names (class folders, file names) as they go into the files a person opens: CSV cells that a
spreadsheet would run as formulas, Markdown table cells, and tab-separated terminal lines.

Class and file names come from the data folder, so they may hold anything a file name can: a
``=HYPERLINK(...)`` class, a tab or a newline in a photo's name, a ``|`` in a folder name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# OWASP, "CSV Injection": a cell starting with one of these is a formula to a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# A string that is a plain decimal number (a probability written as text, "-0.25") stays as it is.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def csv_cell(value: Any) -> Any:
    """``value`` made safe for a spreadsheet (OWASP): a string starting with ``= + - @``, a tab
    or a carriage return gets a leading single quote, so it is shown as text and never run.
    Numbers (and strings that are plain decimal numbers, such as ``-0.25``) are left as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(values: Iterable[Any]) -> list[Any]:
    """:func:`csv_cell` of each value of a row (for ``csv.writer``)."""
    return [csv_cell(v) for v in values]


def csv_dict(row: dict[str, Any]) -> dict[str, Any]:
    """:func:`csv_cell` of each value of a row (for ``csv.DictWriter``; keys are column names)."""
    return {key: csv_cell(value) for key, value in row.items()}


def visible(text: Any) -> str:
    """``text`` on one line: tabs, newlines and other control characters written as escapes
    (``\\t``, ``\\n``, ``\\x07``), so that they cannot split a line or a tab-separated field."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), str(text))


def markdown_cell(text: Any) -> str:
    """``text`` as one cell of a Markdown table: on one line (:func:`visible`), ``|`` escaped."""
    return visible(text).replace("|", "\\|")
