"""``dask-manymodel``: inspect runs stored at a URL, and run the demo.

Exit codes: 0 success, 1 the command ran but found failures (a demo run,
training or inference, was not a SUCCESS), 2 bad input (a missing run or
group, an unreachable URL, an unknown protocol), 141 the reader of the output went away (``| head``),
silently, as the shell reports a Unix tool that SIGPIPE ended.
"""

from __future__ import annotations

import argparse
import codecs
import datetime
import itertools
import json
import os
import posixpath
import re
import shlex
import sys
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .exceptions import (
    InvalidArgumentError,
    InvalidURLError,
    ManyModelError,
    PartitionNotFoundError,
    RunNotFoundError,
)
from .store import FORMAT_VERSION, RUN_MANIFEST, cat_files, is_null, normalize_key, open_url, shown_url


# C0 and C1 control characters and DEL: a terminal acts on them (ESC starts
# sequences that clear the screen, retitle the window, write the clipboard),
# and what a run stored (group values, errors, logs, its folders' names) may
# come from anyone's data or files
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # less newline and tab


def _visible(text: Any, keep_lines: bool = False) -> str:
    """``text`` with its control characters written as Python writes them in a
    repr (``\\x1b``, ``\\r``), so that printing it cannot drive the terminal;
    ``keep_lines`` keeps newlines and tabs (logs, a traceback).

    Examples
    --------
    >>> _visible("a\\x1b[2Jb")
    'a\\\\x1b[2Jb'
    """
    pattern = _CONTROL_BUT_LINES if keep_lines else _CONTROL
    return pattern.sub(lambda found: repr(found.group())[1:-1], str(text))


def _shell_word(text: str) -> str:
    """``shlex.quote(text)``; a text with control characters as bash's
    ``$'...'`` instead, with them as escapes that bash turns back into them
    (so the word is still one to paste after ``logs URL RUN_ID``)."""
    if not _CONTROL.search(text):
        return shlex.quote(text)
    out = []
    for char in text:
        if char in "\\'":
            out.append("\\" + char)
        elif _CONTROL.match(char):
            # bash reads \xHH as a byte: one above 0x7f as the character's code point
            out.append(f"\\x{ord(char):02x}" if ord(char) < 0x80 else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "$'" + "".join(out) + "'"


def _created_text(created: Any) -> str:
    """A run's ``created`` time to the second, in UTC and saying so (``Z``):
    cut at the second alone, the stored UTC time read as the local time of
    whoever runs the command, hours off."""
    if not isinstance(created, str):
        return ""
    try:
        moment = datetime.datetime.fromisoformat(created)
    except ValueError:
        return created[:19]
    if moment.tzinfo is None:  # as written by hand: the time as it is
        return moment.strftime("%Y-%m-%dT%H:%M:%S")
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: list[dict], columns: list[str]) -> str:
    rows = [{c: _visible(r.get(c, "")) for c in columns} for r in rows]
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def _storage_options(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"--storage-options must be a JSON object, got {text!r}: {exc}") from None
    if not isinstance(options, dict):
        raise InvalidArgumentError(f"--storage-options must be a JSON object, got {text!r}")
    return options


def _reach(url: str, storage_options: dict | None) -> tuple[Any, str]:
    """Open ``url`` and check that it can be listed; every backend error
    (credentials, DNS, a refused connection) becomes one clear message."""
    fs, base = open_url(url, storage_options)
    # fsspec keeps an object store's listings for as long as its file system
    # lives (one per storage_options, for the whole process): a second call
    # in a notebook listed none of the runs written meanwhile by others
    fs.invalidate_cache(base)
    try:
        exists = fs.exists(base)
        # `runs FILE` listed "no runs at FILE" and exited 0, as for an empty folder
        is_file = exists and fs.isfile(base)
    except Exception as exc:
        raise InvalidURLError(
            f"cannot reach {shown_url(url)!r}: {type(exc).__name__}: {exc}; check the URL and --storage-options"
        ) from exc
    if not exists:
        raise RunNotFoundError(f"no runs at {shown_url(url)!r}: the location does not exist")
    if is_file:
        raise InvalidURLError(
            f"{shown_url(url)!r} is a file, not a folder of runs; give the folder that holds the runs' folders"
        )
    return fs, base


def cmd_runs(args: argparse.Namespace) -> int:
    fs, base = _reach(args.url, args.storage_options)
    entries = fs.ls(base, detail=True)
    manifests = [posixpath.join(e["name"], RUN_MANIFEST) for e in entries if e["type"] == "directory"]
    found = cat_files(fs, manifests) if manifests else {}  # a URL with [ ] read as it is named
    rows = []
    closed = []  # folders that cannot be opened and may be runs
    # the folder's name is the run's id for show, logs and restore_from; the
    # run_id inside _run.json stays the old one when a folder is copied
    by_folder = {posixpath.basename(posixpath.dirname(path)): data for path, data in found.items()}
    for folder, data in sorted(by_folder.items()):
        if isinstance(data, Exception):  # there, but access denied or an I/O error
            if _cannot_list(fs, posixpath.join(base, folder)):
                # the folder itself is closed: not known to hold a run, so
                # not in the table; said below unless its name is no run_id
                # (a disk's lost+found)
                if _could_be_run_id(folder):
                    closed.append(folder)
                continue
            rows.append({"run_id": folder, "status": f"unreadable {RUN_MANIFEST}",
                         "note": f"{type(data).__name__}: {data}"})
            continue
        try:
            manifest = json.loads(data)
            row = {
                "run_id": folder,
                "kind": manifest["kind"],
                "status": manifest["status"],
                "groups": manifest.get("n_groups", ""),
                "created": _created_text(manifest.get("created")),
            }
            version = manifest.get("format_version", FORMAT_VERSION)
            if not isinstance(version, int) or isinstance(version, bool):
                raise ValueError(f"format_version {version!r}")  # damaged, as restore_from says
            if version > FORMAT_VERSION:
                row["note"] = f"written by a later dask_manymodel (storage format {version})"
            elif manifest.get("run_id") != folder:
                row["note"] = f"{RUN_MANIFEST} says run_id {manifest.get('run_id')!r} (a copied folder?)"
            elif row["status"] == "IN_PROGRESS":
                # the client that ran it may have died before writing the final
                # status: as show and restore_from say, from the groups' statuses
                row["status"] = _status_from_groups(args, folder, row["status"])
            rows.append(row)
        except (ValueError, KeyError, TypeError):  # a damaged manifest: list the folder anyway
            rows.append({"run_id": folder, "status": f"unreadable {RUN_MANIFEST}"})
    if not rows:
        print(f"no runs at {shown_url(args.url)}{_a_run_itself(fs, base, args.url)}")
    else:
        columns = ["run_id", "kind", "status", "groups", "created"]
        print(_table(rows, columns + ["note"] if any("note" in r for r in rows) else columns))
    if closed:
        # another user's runs written under umask 077 (folders mode 700):
        # "no runs at URL" alone said that they were not there
        shown = ", ".join(_visible(name) for name in closed[:10]) + (", ..." if len(closed) > 10 else "")
        print(
            f"dask-manymodel: {len(closed)} folder(s) at {shown_url(args.url)} cannot be opened here "
            f"(permission denied), so they are not listed, runs or not: {shown}",
            file=sys.stderr,
        )
    return 0


def _a_run_itself(fs: Any, base: str, url: str) -> str:
    """A hint when ``url`` is the folder of one run (``runs models/r1``):
    "no runs at models/r1" alone read as if the run were gone."""
    try:
        if not fs.exists(posixpath.join(base, RUN_MANIFEST)):
            return ""
    except Exception:  # only a hint
        return ""
    shown = shown_url(url).rstrip("/")
    parent, _, name = shown.rpartition("/")
    if not parent or not name:
        return ""
    return (
        f": it is itself the folder of a run; list the runs beside it with `dask-manymodel runs {_shell_word(parent)}`, "
        f"or see this one with `dask-manymodel show {_shell_word(parent)} {_shell_word(name)}`"
    )


def _could_be_run_id(name: str) -> bool:
    from .engine import check_run_id

    try:
        check_run_id(name)
    except InvalidArgumentError:
        return False
    return True


def _cannot_list(fs: Any, folder: str) -> bool:
    """Whether listing ``folder`` is refused: then what it holds is not
    known, and a ``_run.json`` that cannot be read there is no evidence of a
    run (a mount's ``lost+found``, root's and closed to others)."""
    try:
        fs.ls(folder, detail=False)
    except PermissionError:
        return True
    except Exception:  # another error: the _run.json's own says more
        return False
    return False


def _status_from_groups(args: argparse.Namespace, run_id: str, stored: str) -> str:
    """A run whose ``_run.json`` says IN_PROGRESS: its status as a restored
    handle tells it (one batched read of its groups' statuses)."""
    from .run import ManyModelRun

    try:
        return ManyModelRun.restore_from(run_id, args.url, args.storage_options).status.value
    except Exception:  # unreadable now: what _run.json says
        return stored


def _restore(args: argparse.Namespace):
    from .run import ManyModelRun

    _reach(args.url, args.storage_options)
    return ManyModelRun.restore_from(args.run_id, args.url, args.storage_options)


# how show prints a null group; logs takes these too (pandas' and numpy's words
# for a null), unless the column holds that very string
NULL_TEXT = "None"
_NULL_WORDS = {NULL_TEXT, "nan", "NaN", "NaT", "<NA>"}
# the words show picks from for a column's null group, the first that is no
# other group's text in that column (see _null_texts)
_NULL_CHOICES = (NULL_TEXT, "NaN", "NaT", "<NA>", "nan")


def _value_text(value: Any, null_text: str = NULL_TEXT) -> str:
    """One group value as plain text (no quotes or type names of a repr), that
    :func:`_readings` reads back into the same group."""
    if isinstance(value, np.generic):
        value = value.item()
    if is_null(value):
        return null_text
    if isinstance(value, (datetime.date, datetime.time)):  # pd.Timestamp too: ISO, no space
        return value.isoformat()
    return str(value)


def _null_texts(run: Any) -> list[str]:
    """The word for the null group of each of ``run``'s partition_by columns:
    ``None``, unless a group of that column is the text ``"None"`` (a string
    column with both showed two groups as ``None``, and ``logs ... None``
    reached the text one only); then the first of ``NaN``, ``NaT``, ``<NA>``,
    ``nan`` that no group's text is, which ``logs`` reads as the null."""
    n_columns = len(run.partition_by)
    keys = [normalize_key(run._partition_id(g), n_columns) for g in run._groups]
    words = []
    for i in range(n_columns):
        taken = {key[i] for key in keys if isinstance(key[i], str)}  # (only text can be these words)
        words.append(next((w for w in _NULL_CHOICES if w not in taken), NULL_TEXT))
    return words


def group_text(partition_id: Any, n_columns: int, null_texts: Sequence[str] | None = None) -> str:
    """A group as show prints it and logs takes it: its values, one per
    partition_by column, quoted as a shell needs them and joined by spaces
    (one with control characters as bash's ``$'...'``, see :func:`_shell_word`).

    Examples
    --------
    >>> group_text(("a b", 1.0), 2)
    "'a b' 1.0"
    >>> print(group_text("\\x1b[2J", 1))
    $'\\x1b[2J'
    """
    null_texts = null_texts or [NULL_TEXT] * n_columns
    key = normalize_key(partition_id, n_columns)
    return " ".join(_shell_word(_value_text(v, null)) for v, null in zip(key, null_texts))


def _readings(text: str, column: list) -> list:
    """The values ``text`` may name in a column holding the values ``column``:
    the text itself first (a string group, or an int's folder), then the text
    read as the column's own types, so that 1.0 finds 1, and 2020-01-01 a
    Timestamp."""
    readings: list = [text]
    kinds = {type(v) for v in column if not is_null(v)}
    if text in _NULL_WORDS:
        readings.append(None)
    parsers = []
    if kinds & {int, float, bool}:
        parsers.append(float)
    if pd.Timestamp in kinds:
        parsers.append(pd.Timestamp)
    if pd.Timedelta in kinds:
        parsers.append(pd.Timedelta)
    if datetime.date in kinds:
        parsers.append(datetime.date.fromisoformat)
    for parse in parsers:
        try:
            readings.append(parse(text))
        except (ValueError, TypeError, OverflowError):  # not of this type
            continue
    # a time without a zone, in a column with zones: the time in each of them
    zones = {v.tz for v in column if isinstance(v, pd.Timestamp) and v.tz is not None}
    for value in list(readings):
        if isinstance(value, pd.Timestamp) and value.tz is None:
            readings.extend(value.tz_localize(zone) for zone in zones)
    return readings


def _as_typed(text: str) -> str:
    """A command-line argument as the terminal sent it: under ``LANG=C``
    Python reads the command line as ASCII and keeps every other byte as a
    surrogate (``店`` as ``'\\udce5\\udcba\\udc97'``), which names no group;
    those bytes are UTF-8 on any terminal of today."""
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeError:  # not UTF-8 either: as Python read it
        return text


def _find_group(run: Any, texts: list[str]) -> str | None:
    """The folder of the group of ``run`` that ``texts`` (one per partition_by
    column) name, found by the run's own lookup, as ``run.get_model`` finds a
    group; None when no group matches."""
    n_columns = len(run.partition_by)
    texts = [_as_typed(text) for text in texts]
    if len(texts) != n_columns:
        raise InvalidArgumentError(
            f"run {run.run_id!r} has {n_columns} partition_by columns {run.partition_by!r}: "
            f"give one value for each, got {len(texts)}: {shlex.join(texts)}"
        )
    keys = [normalize_key(run._partition_id(g), n_columns) for g in run._groups]
    columns = [[key[i] for key in keys] for i in range(n_columns)]
    for key in itertools.product(*(_readings(t, c) for t, c in zip(texts, columns))):
        try:
            return run._group_for(key)["path"]
        except PartitionNotFoundError:
            continue
    return None


def _at_least(name: str, value: int, least: int) -> None:
    """Refuse a numeric option below ``least`` before any work starts (a
    demo with 0 workers waits for ever, a negative --top slices from the end)."""
    if value < least:
        raise InvalidArgumentError(f"{name} must be at least {least}, got {value}")


def cmd_show(args: argparse.Namespace) -> int:
    from .run import PartitionStatus

    _at_least("--top", args.top, 0)
    run = _restore(args)
    summary, status = run._summary_and_status()  # (one read of the groups' statuses)
    print(f"run {run.run_id} ({_visible(run.kind)}) at {shown_url(args.url)}: {status.value}")
    counts = run._counts(dict(zip(summary["path"], summary["status"].map(PartitionStatus))))
    if counts:
        print(_table([{"status": k, "groups": v} for k, v in counts.items()], ["status", "groups"]))
    else:
        print("no groups")
    n_columns, nulls = len(run.partition_by), _null_texts(run)
    done = summary[summary["status"] == "DONE"].nlargest(args.top, "seconds")
    if len(done):
        print("\nslowest groups:")
        rows = [
            {
                "group": group_text(r.partition_id, n_columns, nulls),
                "seconds": f"{r.seconds:.3f}",
                "rows": r.rows,
            }
            for r in done.itertuples()
        ]
        print(_table(rows, ["group", "seconds", "rows"]))
    failed = summary[summary["status"].isin(["FAILED", "INTERNAL_ERROR"])]
    if len(failed):
        print(f"\nfailed groups ({len(failed)}):")
        for row in failed.head(args.top).itertuples():
            first_line = row.error.splitlines()[0] if row.error else ""
            print(f"  {group_text(row.partition_id, n_columns, nulls)}: {row.status}: {_visible(first_line)}")
        if len(failed) > args.top:
            print(f"  ... and {len(failed) - args.top} more")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    run = _restore(args)
    n_columns, nulls = len(run.partition_by), _null_texts(run)
    path = _find_group(run, args.group)
    if path is None:
        sample = ", ".join(group_text(run._partition_id(g), n_columns, nulls) for g in run._groups[:5])
        raise PartitionNotFoundError(
            f"run {args.run_id!r} has no group {' '.join(map(repr, args.group))} (partition_by "
            f"{run.partition_by!r}); groups include: {sample or 'none'}; "
            f"`dask-manymodel show {shown_url(args.url)} {args.run_id}` lists more"
        )
    group = run._details([path])[path]  # that group's status alone
    print(f"group {group_text(group.partition_id, n_columns, nulls)}: {group.status.value}")
    if group.error:
        print(f"error: {_visible(group.error.splitlines()[0])}")
    # as captured, less what would drive the terminal (colours too: shown as \x1b[...)
    for text in (group.logs or "(no logs captured)", group.traceback):
        if text:
            print(_visible(text, keep_lines=True), end="" if text.endswith("\n") else "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    for name, value in (("--groups", args.groups), ("--rows", args.rows), ("--workers", args.workers)):
        _at_least(name, value, 1)
    from .demo import run_demo

    return run_demo(args.url, n_stores=args.groups, rows_per_store=args.rows, n_workers=args.workers)


# not the module docstring's first line: under ``python -OO`` (or
# PYTHONOPTIMIZE=2, which the console script obeys too) docstrings are None,
# and every command died in build_parser with an AttributeError
_DESCRIPTION = "inspect runs stored at a URL, and run the demo"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dask-manymodel", description=_DESCRIPTION)
    # the first thing asked of a tool in a bug report, and of the workers'
    # (their version must match the client's: see check_workers_environment)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument(
        "--storage-options", metavar="JSON", default=None,
        help='fsspec options as JSON, e.g. \'{"anon": true}\'; never stored',
    )
    p = sub.add_parser("runs", parents=[storage], help="list the runs stored at URL")
    p.add_argument("url")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("show", parents=[storage], help="status counts, slowest and failed groups of a run")
    p.add_argument("url")
    p.add_argument("run_id")
    p.add_argument("--top", type=int, default=5, help="how many slow/failed groups to list (default: 5)")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("logs", parents=[storage], help="captured logs and traceback of one group")
    p.add_argument("url")
    p.add_argument("run_id")
    p.add_argument("group", nargs="+", help="the group's value (one per partition_by column)")
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser(
        "demo", help="train 1,000 models on a LocalCluster into a local folder, then score with them",
        description="Train one model per store on synthetic sales, then score with them, on a "
        "LocalCluster of its own. The runs are demo-train and demo-scores under --url, replaced "
        "if they are there. Exit code 1 if the training run is not a SUCCESS.",
    )
    p.add_argument("--url", default="./manymodel-demo", help="where to store the runs (default: ./manymodel-demo)")
    p.add_argument("--groups", type=int, default=1000, help="how many stores, one model each (default: 1000)")
    p.add_argument("--rows", type=int, default=200, help="rows per store (default: 200)")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the LocalCluster (default: 2)")
    p.set_defaults(func=cmd_demo)
    return parser


def _output_closed() -> int:
    """Stop quietly when stdout's reader has gone (``show ... | head -1``), as
    Unix tools do: not an error of the storage. What stdout still buffers goes
    to devnull, or Python's final flush at exit would print a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (captured, e.g. by pytest)
        pass
    return 141  # 128 + SIGPIPE: what `set -o pipefail` sees of `yes | head -1`


def _bytes_back_or_escaped(exc: UnicodeError) -> tuple[str | bytes, int]:
    """An encoding error handler: surrogates back to the bytes they stand for
    (``surrogateescape``: a path typed under ``LANG=C`` prints as typed), any
    other character as an escape (``backslashreplace``: ``\\u5e97``)."""
    try:
        return codecs.lookup_error("surrogateescape")(exc)
    except UnicodeError:
        return codecs.backslashreplace_errors(exc)


codecs.register_error("dask_manymodel.cli", _bytes_back_or_escaped)


def _escaping_what_cannot_be_shown() -> None:
    """Print a character that stdout's encoding cannot write as an escape
    (``\\u5e97``), as Python's stderr does, instead of dying on it with a
    traceback: a group value or a log line in Chinese under ``LANG=C`` (an
    ASCII stdout), or a surrogate that a group printed (a file name that is
    not UTF-8, read by ``os.listdir``) on a UTF-8 one; surrogates print as
    the bytes they stand for, as Python's stdout does under ``LANG=C``."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="dask_manymodel.cli")
        except (AttributeError, ValueError, OSError):  # not a text file (replaced, closed)
            continue


_LOGS_OPTIONS = ("--storage-options", "--help")


def _logs_values_as_values(argv: list[str]) -> list[str]:
    """``logs URL RUN_ID -x`` as ``logs URL RUN_ID -- -x``: a group value that
    starts with ``-`` (the text ``-x``, printed so by show) was taken by
    argparse for an option ("the following arguments are required: group").
    What names logs' own options (``-h``, ``--storage-options JSON`` or an
    abbreviation of it) stays an option; an argv that has ``--`` already is
    left as it is."""
    if argv[:1] != ["logs"] or "--" in argv:
        return argv
    options, values = [], []
    rest = iter(argv[1:])
    for word in rest:
        name = word.split("=", 1)[0]
        if word == "-h" or (len(name) > 2 and any(o.startswith(name) for o in _LOGS_OPTIONS)):
            options.append(word)
            if "=" not in word and "--storage-options".startswith(name):
                options.extend(itertools.islice(rest, 1))  # its JSON
        else:
            values.append(word)
    return ["logs", *options, "--", *values]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dask-manymodel`` console script; returns the exit code."""
    _escaping_what_cannot_be_shown()
    argv = _logs_values_as_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "storage_options"):
            args.storage_options = _storage_options(args.storage_options)
        code = args.func(args)
        # piped output waits in stdout's buffer: a reader that is gone shows here
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _output_closed()
    except ManyModelError as exc:
        print(f"dask-manymodel: error: {_visible(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # the demo writes its runs: "cannot read" the URL sent one looking
        # for a missing file where a folder could not be made
        action = "write to" if args.command == "demo" else "read"
        print(f"dask-manymodel: error: cannot {action} {shown_url(args.url)!r}: {_visible(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
