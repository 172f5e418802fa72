"""``dask-manymodel``: inspect runs stored at a URL, and run the demo.

Exit codes: 0 success, 1 the command ran but found failures (e.g. the demo
run was not a SUCCESS), 2 bad input (a missing run or group, an unreachable
URL, an unknown protocol), 141 the reader of the output went away (``| head``),
silently, as the shell reports a Unix tool that SIGPIPE ended.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from typing import Any, Sequence

from .exceptions import (
    InvalidArgumentError,
    InvalidURLError,
    ManyModelError,
    PartitionNotFoundError,
    RunNotFoundError,
)
from .store import RUN_MANIFEST, open_url


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip() for r in rows]
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
    try:
        exists = fs.exists(base)
    except Exception as exc:
        raise InvalidURLError(
            f"cannot reach {url!r}: {type(exc).__name__}: {exc}; check the URL and --storage-options"
        ) from exc
    if not exists:
        raise RunNotFoundError(f"no runs at {url!r}: the location does not exist")
    return fs, base


def cmd_runs(args: argparse.Namespace) -> int:
    fs, base = _reach(args.url, args.storage_options)
    entries = fs.ls(base, detail=True)
    manifests = [posixpath.join(e["name"], RUN_MANIFEST) for e in entries if e["type"] == "directory"]
    found = fs.cat(manifests, on_error="omit") if manifests else {}
    rows = []
    # the folder's name is the run's id for show, logs and restore_from; the
    # run_id inside _run.json stays the old one when a folder is copied
    by_folder = {posixpath.basename(posixpath.dirname(path)): data for path, data in found.items()}
    for folder, data in sorted(by_folder.items()):
        try:
            manifest = json.loads(data)
            row = {
                "run_id": folder,
                "kind": manifest["kind"],
                "status": manifest["status"],
                "groups": manifest.get("n_groups", ""),
                "created": (manifest.get("created") or "")[:19],
            }
            if manifest.get("run_id") != folder:
                row["note"] = f"{RUN_MANIFEST} says run_id {manifest.get('run_id')!r} (a copied folder?)"
            rows.append(row)
        except (ValueError, KeyError, TypeError):  # a damaged manifest: list the folder anyway
            rows.append({"run_id": folder, "status": f"unreadable {RUN_MANIFEST}"})
    if not rows:
        print(f"no runs at {args.url}")
        return 0
    columns = ["run_id", "kind", "status", "groups", "created"]
    print(_table(rows, columns + ["note"] if any("note" in r for r in rows) else columns))
    return 0


def _restore(args: argparse.Namespace):
    from .run import ManyModelRun

    _reach(args.url, args.storage_options)
    return ManyModelRun.restore_from(args.run_id, args.url, args.storage_options)


def _at_least(name: str, value: int, least: int) -> None:
    """Refuse a numeric option below ``least`` before any work starts (a
    demo with 0 workers waits for ever, a negative --top slices from the end)."""
    if value < least:
        raise InvalidArgumentError(f"{name} must be at least {least}, got {value}")


def cmd_show(args: argparse.Namespace) -> int:
    _at_least("--top", args.top, 0)
    run = _restore(args)
    summary = run.summary()
    print(f"run {run.run_id} ({run.kind}) at {args.url}: {run.status.value}")
    counts = run._counts()
    if counts:
        print(_table([{"status": k, "groups": v} for k, v in counts.items()], ["status", "groups"]))
    else:
        print("no groups")
    done = summary[summary["status"] == "DONE"].nlargest(args.top, "seconds")
    if len(done):
        print("\nslowest groups:")
        rows = [
            {"group": repr(r.partition_id), "seconds": f"{r.seconds:.3f}", "rows": r.rows}
            for r in done.itertuples()
        ]
        print(_table(rows, ["group", "seconds", "rows"]))
    failed = summary[summary["status"].isin(["FAILED", "INTERNAL_ERROR"])]
    if len(failed):
        print(f"\nfailed groups ({len(failed)}):")
        for row in failed.head(args.top).itertuples():
            first_line = row.error.splitlines()[0] if row.error else ""
            print(f"  {row.partition_id!r}: {row.status}: {first_line}")
        if len(failed) > args.top:
            print(f"  ... and {len(failed) - args.top} more")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from .store import group_path, normalize_key

    run = _restore(args)
    key = args.group[0] if len(args.group) == 1 else tuple(args.group)
    try:
        path = group_path(run.partition_by, normalize_key(key, len(run.partition_by)))
    except KeyError as exc:  # wrong number of values for the run's columns
        raise InvalidArgumentError(str(exc.args[0])) from None
    details = run._details()
    if path not in details:
        raise PartitionNotFoundError(
            f"run {args.run_id!r} has no group {key!r} (partition_by {run.partition_by!r}); "
            f"`dask-manymodel show {args.url} {args.run_id}` lists some"
        )
    group = details[path]
    print(f"group {group.partition_id!r}: {group.status.value}")
    if group.error:
        print(f"error: {group.error.splitlines()[0]}")
    if group.logs:
        print(group.logs, end="" if group.logs.endswith("\n") else "\n")
    else:
        print("(no logs captured)")
    if group.traceback:
        print(group.traceback, end="" if group.traceback.endswith("\n") else "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    for name, value in (("--groups", args.groups), ("--rows", args.rows), ("--workers", args.workers)):
        _at_least(name, value, 1)
    from .demo import run_demo

    return run_demo(args.url, n_stores=args.groups, rows_per_store=args.rows, n_workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dask-manymodel", description=__doc__.splitlines()[0])
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
    p.add_argument("--top", type=int, default=5, help="how many slow/failed groups to list")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("logs", parents=[storage], help="captured logs and traceback of one group")
    p.add_argument("url")
    p.add_argument("run_id")
    p.add_argument("group", nargs="+", help="the group's value (one per partition_by column)")
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("demo", help="train 1,000 models on a LocalCluster into a local folder")
    p.add_argument("--url", default="./manymodel-demo", help="where to store the runs")
    p.add_argument("--groups", type=int, default=1000)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dask-manymodel`` console script; returns the exit code."""
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
        print(f"dask-manymodel: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dask-manymodel: error: cannot read {args.url!r}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
