"""``dask-manymodel``: inspect runs stored at a URL, and run the demo.

Exit codes: 0 success, 1 the command ran but found failures (e.g. the demo
run was not a SUCCESS), 2 bad input (a missing run, an unreachable URL).
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from typing import Sequence

from .exceptions import ManyModelError
from .store import RUN_MANIFEST, open_url


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def cmd_runs(args: argparse.Namespace) -> int:
    fs, base = open_url(args.url)
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        raise ManyModelError(f"no runs at {args.url!r}: the location does not exist") from None
    manifests = [posixpath.join(e["name"], RUN_MANIFEST) for e in entries if e["type"] == "directory"]
    found = fs.cat(manifests, on_error="omit") if manifests else {}
    rows = []
    for path, data in sorted(found.items()):
        manifest = json.loads(data)
        rows.append(
            {
                "run_id": manifest["run_id"],
                "kind": manifest["kind"],
                "status": manifest["status"],
                "groups": manifest.get("n_groups", ""),
                "created": manifest.get("created", "")[:19],
            }
        )
    if not rows:
        print(f"no runs at {args.url}")
        return 0
    print(_table(rows, ["run_id", "kind", "status", "groups", "created"]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .run import ManyModelRun

    run = ManyModelRun.restore_from(args.run_id, args.url)
    summary = run.summary()
    print(f"run {run.run_id} ({run.kind}) at {args.url}: {run.status.value}")
    print(summary["status"].value_counts().to_string() if len(summary) else "no groups")
    done = summary[summary["status"] == "DONE"].nlargest(args.top, "seconds")
    if len(done):
        print("\nslowest groups:")
        print(done[["partition_id", "seconds", "rows"]].to_string(index=False))
    failed = summary[summary["status"].isin(["FAILED", "INTERNAL_ERROR"])]
    if len(failed):
        print("\nfailed groups:")
        for row in failed.head(args.top).itertuples():
            first_line = (row.error or "").splitlines()[0] if row.error else ""
            print(f"  {row.partition_id!r}: {row.status}: {first_line}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from .run import ManyModelRun

    run = ManyModelRun.restore_from(args.run_id, args.url)
    key = args.group[0] if len(args.group) == 1 else tuple(args.group)
    details = run._details()
    from .store import group_path, normalize_key

    path = group_path(run.partition_by, normalize_key(key, len(run.partition_by)))
    if path not in details:
        raise ManyModelError(f"run {args.run_id!r} has no group {key!r}")
    group = details[path]
    print(f"group {group.partition_id!r}: {group.status.value}")
    if group.logs:
        print(group.logs, end="" if group.logs.endswith("\n") else "\n")
    if group.traceback:
        print(group.traceback, end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.url, n_stores=args.groups, rows_per_store=args.rows, n_workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dask-manymodel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("runs", help="list the runs stored at URL")
    p.add_argument("url")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("show", help="status counts, slowest and failed groups of a run")
    p.add_argument("url")
    p.add_argument("run_id")
    p.add_argument("--top", type=int, default=5, help="how many slow/failed groups to list")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("logs", help="captured logs and traceback of one group")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dask-manymodel`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ManyModelError as exc:
        print(f"dask-manymodel: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dask-manymodel: error: cannot read {args.url!r}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
