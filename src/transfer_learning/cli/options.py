"""``key=value`` command lines for the commands that are not Hydra apps (predict, export), in
the style users already type for ``train.py`` and ``eval.py``.

A command declares its options once (:class:`Option`: name, kind, default, help) and gets the
rest from :class:`Command`: parsing (``key=value``; a list as ``key=[a,'b/*.jpg']`` or a single
value; ``null`` for an option whose default is none), ``--help`` / ``-h`` / ``help``, and one-line
messages for mistakes: an unknown key with the closest known one, a value naming the key and
what it must be, and a command line in an older style (positional arguments, ``--flags``)
rewritten in the new form, ready to copy.
"""

from __future__ import annotations

import ast
import difflib
import math
import os
import re
import shlex
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer_learning.errors import ConfigError

HELP_WORDS = ("-h", "--help", "help")
HELP_WIDTH = 100
REQUIRED: Any = object()  # the default of an option the command cannot run without
NULL_WORDS = ("null", "none")
_KEY = re.compile(r"^\+{0,2}(?P<key>[A-Za-z_][\w.-]*)=(?P<value>.*)$", re.DOTALL)
_NEEDS_QUOTES = re.compile(r"""[,\[\]'"\s]""")


class UsageError(ConfigError):
    """A command line the command cannot run (exit status 2); the message names the fix."""


@dataclass(frozen=True)
class Kind:
    """What a value must be: ``what`` completes "must be ..." in messages, ``metavar`` stands
    for the value in ``--help``, ``convert`` turns the text into the value (ValueError if not)."""

    what: str
    metavar: str
    convert: Callable[[str], Any]


def _checked(what: str, metavar: str, convert: Callable[[str], Any], ok: Callable[[Any], bool]) -> Kind:
    def run(text: str) -> Any:
        value = convert(text)
        if not ok(value):
            raise ValueError(what)
        return value

    return Kind(what, metavar, run)


def integer(minimum: int | None = None, metavar: str = "N") -> Kind:
    what = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    return _checked(what, metavar, int, lambda v: minimum is None or v >= minimum)


def number(minimum: float | None = None, maximum: float | None = None, metavar: str = "X") -> Kind:
    if minimum is not None and maximum is not None:
        what = f"a number in [{minimum:g}, {maximum:g}]"
    else:
        what = "a number" + (f" >= {minimum:g}" if minimum is not None else "")
    lo, hi = -math.inf if minimum is None else minimum, math.inf if maximum is None else maximum
    return _checked(what, metavar, float, lambda v: lo <= v <= hi)  # NaN fails both


def choice(*values: str) -> Kind:
    """One of ``values``, any case (``format=ONNX``)."""
    return _checked("one of " + ", ".join(values), "|".join(values), str.lower, lambda v: v in values)


def path(metavar: str = "PATH", suffixes: Sequence[str] = ()) -> Kind:
    """A file or folder name, ``~`` and ``$VARS`` expanded; with ``suffixes``, a file name ending
    in one of them."""
    from transfer_learning.run.config import expand_path

    what = "a file name ending in " + " or ".join(suffixes) if suffixes else "a path"
    return _checked(
        what, metavar, lambda t: Path(expand_path(t)),
        lambda p: str(p) != "." and (not suffixes or p.suffix.lower() in suffixes),
    )  # fmt: skip


def text(metavar: str = "TEXT") -> Kind:
    """Any non-empty text (glob patterns, device names)."""
    return _checked("a non-empty value", metavar, str, bool)


@dataclass(frozen=True)
class Option:
    """One ``name=value`` setting. ``many``: a list (``name=[a,b]``, or one value alone).
    ``default`` is REQUIRED, or what the setting is when not given (``None``: "none" / "auto",
    and the value ``null`` sets it back); ``shown`` is how ``--help`` shows it."""

    name: str
    kind: Kind
    help: str
    default: Any = None
    many: bool = False
    shown: str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def default_text(self) -> str:
        if self.required:
            return "required"
        if self.shown is not None:
            return f"default: {self.shown}"
        return f"default: {'none' if self.default in (None, ()) else self.default}"

    def convert(self, raw: str) -> Any:
        """The value of ``name=<raw>`` (UsageError naming the key and what it must be)."""
        if self.default is None and not self.required and raw.lower() in NULL_WORDS:
            return None
        items = split_list(raw)
        if items is None:  # a single value
            value = unquote(raw)
            if self.many and "," in value and not os.path.lexists(value):
                raise UsageError(
                    f"{self.name}={raw}: nothing has this name; for several values write "
                    f"{self.name}=[{value}] (a list)."
                )
            items = [value]
        elif not self.many:
            raise UsageError(f"{self.name}={raw}: {self.name} takes one value, not a list.")
        values = []
        for item in items:
            try:
                values.append(self.kind.convert(item))
            except ValueError:
                raise UsageError(f"{self.name}={raw}: {self.name} must be {self.kind.what}.") from None
        return values if self.many else values[0]


def unquote(value: str) -> str:
    """``'x'`` or ``"x"`` (quotes the shell left in place) as ``x``."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def split_list(value: str) -> list[str] | None:
    """The items of ``[a,'b c',"d,e"]`` (quotes keep commas; brackets inside an item, as in the
    glob ``x/[ab]*.jpg``, stay in it), or None when ``value`` is not a list."""
    if not (value.startswith("[") and value.endswith("]")):
        return None
    items, current, quote, depth = [], "", "", 0
    for char in value[1:-1]:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[]":
            depth += 1 if char == "[" else -1
        elif char == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        current += char
    items.append(current)
    items = [unquote(item.strip()) for item in items]
    return [] if items == [""] else items


def shown_value(values: Sequence[str]) -> str:
    """Values as one ``key=`` value: a single one as it is, several as a list."""
    if len(values) == 1:
        return values[0]
    return "[" + ",".join(f"'{v}'" if _NEEDS_QUOTES.search(v) else v for v in values) + "]"


@dataclass(frozen=True)
class Command:
    """A command's options and how it reads its command line.

    ``positional``: the options an older form of the command took as positional arguments, in
    order (the last one may be a list), and ``aliases`` its short flags (``{"o": "output"}``):
    both are used only to rewrite such a command line in the new form."""

    prog: str
    summary: str
    options: tuple[Option, ...]
    positional: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    epilog: str = ""

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def usage(self) -> str:
        """The ``--help`` text: the summary, every option with its default, the epilog."""
        required = " ".join(f"{o.name}={o.kind.metavar}" for o in self.options if o.required)
        lines = [f"usage: {self.prog} {required} [key=value ...]", "", self.summary.strip(), "",
                 "Options (key=value; a list as key=[a,b] or one value):"]  # fmt: skip
        indent = " " * 25
        for o in self.options:
            setting = f"  {o.name}={o.kind.metavar}"
            if len(setting) >= len(indent):  # its own line, the text below
                lines.append(setting)
                setting = ""
            described = f"{setting:<24} {o.help} ({o.default_text()})"
            lines += textwrap.wrap(described, HELP_WIDTH, subsequent_indent=indent, break_on_hyphens=False)
        return "\n".join([*lines, *(["", self.epilog.strip()] if self.epilog else [])])

    def parse(self, argv: Sequence[str]) -> dict[str, Any]:
        """Every option's value (defaults filled in); raises :class:`UsageError`."""
        given: dict[str, str] = {}
        for arg in argv:
            match = _KEY.match(arg)
            if match is None:
                raise UsageError(self._not_key_value(arg, argv))
            key = match["key"]
            if self.option(key) is None:
                raise UsageError(self._unknown(key))
            given[key] = match["value"]
        values = {o.name: o.convert(given[o.name]) for o in self.options if given.get(o.name)}
        missing = [o for o in self.options if o.required and values.get(o.name) in (None, [])]
        if missing:  # not given, or given empty (`images=`, `images=[]`)
            needed = "; ".join(f"{o.name}=... is required: {o.help}" for o in missing)
            raise UsageError(f"{needed} (see --help).")
        return {o.name: values.get(o.name, o.default) for o in self.options}

    def parse_or_exit(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """:meth:`parse` for a ``main``: ``--help`` prints the usage and exits 0, a mistake
        prints one line on stderr and exits 2."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if wants_help(argv):
            print(self.usage())
            raise SystemExit(0)
        try:
            return self.parse(argv)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    def _unknown(self, key: str) -> str:
        names = [o.name for o in self.options]
        spelled = key.lower().replace("-", "_").replace(".", "_")
        close = [spelled] if spelled in names else difflib.get_close_matches(spelled, names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"unknown option {key!r}: {hint}{self.prog} takes {', '.join(names)} (see --help)."

    def _not_key_value(self, arg: str, argv: Sequence[str]) -> str:
        rewritten = self.rewrite(argv)
        start = f"{arg!r} is not key=value: {self.prog} takes key=value arguments, as train.py does"
        if rewritten is None:
            return f"{start} (see --help)."
        return f"{start}; write: {rewritten}"

    def rewrite(self, argv: Sequence[str]) -> str | None:
        """An older command line (positional arguments, ``--flag value``, ``--flag=value``) in
        key=value form, quoted for the shell; None when it cannot be read that way."""
        values: dict[str, list[str]] = {}
        loose: list[str] = []
        args = list(argv)
        while args:
            arg = args.pop(0)
            match = _KEY.match(arg)
            if arg.startswith("-") and len(arg) > 1:
                flag, has_value, value = arg.lstrip("-").partition("=")
                name = self.aliases.get(flag, flag.replace("-", "_"))
                if self.option(name) is None or not (has_value or args):
                    return None
                values[name] = [value if has_value else args.pop(0)]
            elif match is not None and self.option(match["key"]) is not None:
                values[match["key"]] = split_list(match["value"]) or [unquote(match["value"])]
            else:
                loose.append(arg)
        slots = [name for name in self.positional if name not in values]
        if "ckpt_path" in slots:  # a checkpoint is a file ending in .ckpt, wherever it was typed
            ckpts = [a for a in loose if a.endswith(".ckpt") and not Path(a).is_dir()]
            if len(ckpts) == 1:
                values["ckpt_path"] = ckpts
                loose.remove(ckpts[0])
                slots.remove("ckpt_path")
        for i, name in enumerate(slots):
            if not loose:
                break
            option = self.option(name)
            last = i == len(slots) - 1
            take = len(loose) if last and option is not None and option.many else 1
            values[name], loose = loose[:take], loose[take:]
        if loose:
            return None
        order = [o.name for o in self.options if o.name in values]
        return " ".join([self.prog, *(shlex.quote(f"{n}={shown_value(values[n])}") for n in order)])


def module_doc(relative: str, skip: int = 0) -> str:
    """The docstring of the package's module ``relative`` (``"results/predict/__init__.py"``), read from
    its source without importing it (and torch with it), less its first ``skip`` paragraphs."""
    source = (Path(__file__).parents[1] / relative).read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source)) or ""
    return "\n\n".join(doc.split("\n\n")[skip:])


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in HELP_WORDS for arg in argv)
