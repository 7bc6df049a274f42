"""Manage API keys: `python -m serving.keys [--db PATH|URL] init|add|list|revoke|ledger`.

The database is --db, else UNDISTILLABLE_KEYS_DB, else the service's default (ledger/serving.sqlite beside
serving/): a SQLite file, or a PostgreSQL URL (postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME) that every replica
of the service shares. The running service sees changes at once (every replica, on its next request). A database,
or the tables in a PostgreSQL one, is created only when named (--db or the variable) and asked for with `init` or
`add`, never by a typo or a forgotten variable. A key is shown once, when it is added; only its sha256 is stored.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path

from serving.config import DEFAULT_KEYS_DB, PREFIX
from serving.ledger_rules import LedgerBusy, LedgerUnavailable, is_url, open_ledger, redact


def _when(ts) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.keys", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", help="key and ledger database: a SQLite path or a postgresql:// URL (default: "
                   "UNDISTILLABLE_KEYS_DB, else ledger/serving.sqlite beside serving/)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("init", help="create the database (an empty one; `add` creates it too when it is named)")
    a = sub.add_parser("add", help="create a key and print it (once)")
    a.add_argument("name", help="unique name of the customer or client")
    a.add_argument("--budget", type=int, help="total rows the key may be served (default: unlimited)")
    a.add_argument("--rate", type=float, help="rows per minute, at least 1 (token bucket, bursts up to one minute's "
                   "rows; default: unlimited)")
    a.add_argument("--json", action="store_true")
    ls = sub.add_parser("list", help="keys with their budgets and usage")
    ls.add_argument("--json", action="store_true")
    r = sub.add_parser("revoke", help="revoke a key by its name or its whole 8-character prefix (an argument that "
                       "matches more than one key is refused, listing them)")
    r.add_argument("name")
    led = sub.add_parser("ledger", help="the latest batches served to a key (digest = sha256 of the request body)")
    led.add_argument("name", nargs="?", help="key name or whole prefix (default: batches served while the service ran "
                     "open)")
    led.add_argument("--limit", type=int, default=20)
    led.add_argument("--json", action="store_true")
    return p


def database(args: argparse.Namespace) -> tuple[Path | str, str | None]:
    """The database path (or URL) and, when it may not be used, why: only `init` or a named database may create
    one. A URL's tables are checked when it is opened (`init` and `add` create them)."""
    named = args.db or os.environ.get(PREFIX + "KEYS_DB")
    if is_url(named):
        return named, None
    path = Path(named or DEFAULT_KEYS_DB).expanduser()
    if path.is_file() or args.command == "init" or (named and args.command == "add"):
        return path, None
    if named:
        return path, f"no keys database at {path}; check the path, or create it with `add` or `init`"
    return path, (f"no keys database named: pass --db PATH or set {PREFIX}KEYS_DB (what the service reads), "
                  f"or create the default one ({path}) with `python -m serving.keys init`")


def check_limits(budget: int | None, rate: float | None) -> str | None:
    """Why a key with this budget and rate could not work, or None."""
    if budget is not None and budget < 0:
        return f"--budget {budget}: a budget counts rows, use 0 or more (leave it out for no limit)"
    if rate is not None and not (math.isfinite(rate) and rate >= 1):
        return (f"--rate {rate:g}: the bucket holds one minute of rows, so a rate below 1 row per minute could never "
                "serve a row; use a rate of at least 1 (leave it out for no limit)")
    return None


def one_key(ledger, arg: str, active_only: bool) -> tuple[dict | None, str | None]:
    """The one key named `arg` or whose prefix is `arg`; else why not (none, or several: listed)."""
    found = ledger.find(arg, active_only=active_only)
    if not found:
        return None, f"no {'active ' if active_only else ''}key named {arg!r} or with that prefix"
    if len(found) > 1:
        listed = ", ".join(f"{k['name']!r} (prefix {k['prefix']})" for k in found)
        return None, f"{arg!r} matches {len(found)} keys: {listed}; give the name of one, or its whole prefix"
    return found[0], None


def _limit(value, unit: str) -> str:
    return "unlimited" if value is None else f"{value:g} {unit}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path, problem = database(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.command == "add" and (problem := check_limits(args.budget, args.rate)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    ledger = open_ledger(path, create=args.command in ("init", "add"))
    try:
        return _run(args, ledger, redact(path) if is_url(path) else path)
    except (LedgerBusy, LedgerUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        ledger.close()


def _run(args: argparse.Namespace, ledger, path: Path | str) -> int:
    """One subcommand; 0 on success, 1 when the key or the name is refused."""
    if args.command == "init":
        existed = path.is_file() if isinstance(path, Path) else None
        ledger.active_keys()  # creates the file and its tables
        state = {True: "keys database already exists", False: "created keys database", None: "keys tables ready"}
        print(f"{state[existed]}: {path}")
    elif args.command == "add":
        try:
            key = ledger.add_key(args.name, args.budget, args.rate)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"name": args.name, "key": key, "budget": args.budget, "rate": args.rate}))
        else:
            print(key)
            print(f"(key for {args.name!r} in {path}: budget {_limit(args.budget, 'rows')}, rate "
                  f"{_limit(args.rate, 'rows/min')}; it is not shown again)", file=sys.stderr)
    elif args.command == "list":
        keys = ledger.list_keys()
        if args.json:
            print(json.dumps(keys, indent=2))
        else:
            print(f"{'name':<16} {'prefix':<9} {'budget':>10} {'served':>10} {'left':>10} {'rate/min':>9} "
                  f"{'requests':>8} {'refused':>7}  {'first seen':<19}  {'last seen':<19}  status")
            for k in keys:
                left = "-" if k["row_budget"] is None else k["row_budget"] - k["rows_served"]
                print(f"{k['name']:<16} {k['prefix']:<9} {k['row_budget'] if k['row_budget'] is not None else '-':>10} "
                      f"{k['rows_served']:>10} {left:>10} {k['rate_rows_per_min'] or '-':>9} {k['requests']:>8} "
                      f"{k['refused']:>7}  {_when(k['first_seen']):<19}  {_when(k['last_seen']):<19}  "
                      f"{'revoked ' + _when(k['revoked']) if k['revoked'] else 'active'}")
    elif args.command == "revoke":
        key, problem = one_key(ledger, args.name, active_only=True)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
        ledger.revoke(key["id"])
        print(f"revoked {key['name']} (prefix {key['prefix']})")
    elif args.command == "ledger":
        key_id = None
        if args.name is not None:
            key, problem = one_key(ledger, args.name, active_only=False)
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                return 1
            key_id = key["id"]
        rows = ledger.batches(key_id, args.limit)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for b in rows:
                print(f"{_when(b['ts'])}  {b['endpoint']:<15} {b['rows']:>7} rows  {b['state']:<8}  {b['digest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
