#!/usr/bin/env python3
"""Maglev hashing in-process: table builds, lookups and disruption at 10 to 3000 backends.

For each pool size N (equal weights, names ``backend-0000`` ..., the default table size
``lb.maglev.table_size(N)``) it reports:

- **build s**: ``lb.maglev.build`` (best of ``--repeat``), what the control process
  runs in a thread at every membership change; **ref s**: ``build_reference``, the paper's
  loop as written (one Python step per probe), the same table (checked);
- **table KiB**: the bytes a worker gets per pool (``array.tobytes()``);
- **hash ns**: ``key_hash`` of a client address; **lookup ns**: ``lookup`` with every
  backend usable; **pick ns**: a maglev ``Pool.pick(now, (), key)`` + ``release`` (the hot
  path after the key hash), and **rr ns**: the same pool's pick without a key;
- **fallback ns**: a pick whose key's backend is down (probes to its next choice);
- **moved %**: share of the M slots whose backend changes when one backend is removed
  (``rm``) or one is added (``add``), next to the ideal 1/N and 1/(N+1).

The numbers are judged nowhere (tests/test_maglev.py asserts the properties). Pure CPU,
single process, no network:

    .venv/bin/python bench/maglev.py                       # N = 10,100,1000,3000
    .venv/bin/python bench/maglev.py --markdown --no-reference
    .venv/bin/python bench/maglev.py --quick               # smoke: N = 10,100, few keys
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lb import maglev  # noqa: E402
from lb.data.pool import BackendEntry, build_pool  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--backends", default="10,100,1000,3000", help="comma-separated N values")
    ap.add_argument("--keys", type=int, default=100_000, help="lookups timed per figure")
    ap.add_argument("--repeat", type=int, default=2, help="builds timed (best reported)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the paper's loop (build_reference)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke: N = 10,100, 5,000 keys, one build, no reference")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.quick:
        args.backends, args.keys, args.repeat, args.no_reference = "10,100", 5000, 1, True
    return args


def best_of(repeat: int, fn: Any, *a: Any) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn(*a)
        best = min(best, time.perf_counter() - t0)
    return best, out


def per_op_ns(fn: Any, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / n * 1e9


def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    size = maglev.table_size(n)
    members = [(f"backend-{i:04d}", 1) for i in range(n)]
    build_s, (names, table) = best_of(args.repeat, maglev.build, members, size)
    row: dict[str, Any] = {"backends": n, "size": size, "build_s": build_s,
                           "table_bytes": len(table.tobytes())}
    if not args.no_reference:
        ref_s, ref = best_of(1, maglev.build_reference, members, size)
        assert ref == (names, table), "build and build_reference disagree"
        row["reference_s"] = ref_s
    # Disruption: one removed (a random one), one added.
    owner = [names[i] for i in table]
    gone = members[random.Random(n).randrange(n)][0]
    rn, rt = maglev.build([m for m in members if m[0] != gone], size)
    an, at = maglev.build([*members, ("backend-new", 1)], size)
    row["moved_remove"] = sum(owner[s] != rn[rt[s]] for s in range(size)) / size
    row["moved_add"] = sum(owner[s] != an[at[s]] for s in range(size)) / size
    # Lookups.
    rng = random.Random(1)
    k = args.keys
    addrs = [f"198.51.{rng.randrange(256)}.{rng.randrange(256)}".encode() for _ in range(k)]
    kh = maglev.key_hash
    row["hash_ns"] = per_op_ns(lambda: [kh(a) for a in addrs], k)
    keys = [kh(a) for a in addrs]
    lookup = maglev.lookup

    def yes(i: int) -> bool:
        return True

    row["lookup_ns"] = per_op_ns(lambda: [lookup(table, x, yes) for x in keys], k)
    pool = build_pool("bench", "maglev", [(nm, "127.0.0.1", 1, 1.0) for nm, _ in members])
    pool.set_hash_table(names, table)
    pick, release = pool.pick, pool.release

    def picks(with_key: bool) -> None:
        for x in keys:
            b = pick(0.0, (), x if with_key else None)
            assert b is not None
            release(b)

    row["pick_ns"] = per_op_ns(lambda: picks(True), k)
    row["rr_ns"] = per_op_ns(lambda: picks(False), k)
    # Fallback: 10 % of the backends drained; time the picks of their keys only.
    down = {nm for nm, _ in members[:: 10]}
    pool.apply_delta(1, {nm: BackendEntry(False, 1.0) for nm in down}, False)
    theirs = [x for x in keys if owner[x % size] in down] or keys[:1]
    row["fallback_ns"] = per_op_ns(
        lambda: [release(b) for b in (pick(0.0, (), x) for x in theirs) if b is not None],
        len(theirs))
    return row


COLUMNS = [
    ("N", "backends", "{}"), ("M", "size", "{}"), ("build s", "build_s", "{:.3f}"),
    ("ref s", "reference_s", "{:.3f}"), ("table KiB", "table_bytes", "{:.0f}"),
    ("hash ns", "hash_ns", "{:.0f}"), ("lookup ns", "lookup_ns", "{:.0f}"),
    ("pick ns", "pick_ns", "{:.0f}"), ("rr ns", "rr_ns", "{:.0f}"),
    ("fallback ns", "fallback_ns", "{:.0f}"), ("moved rm %", "moved_remove", "{:.3f}"),
    ("1/N %", "ideal_remove", "{:.3f}"), ("moved add %", "moved_add", "{:.3f}"),
    ("1/(N+1) %", "ideal_add", "{:.3f}"),
]


def render(rows: list[dict[str, Any]], markdown: bool) -> str:
    cells = []
    for r in rows:
        r = dict(r, table_bytes=r["table_bytes"] / 1024, ideal_remove=100 / r["backends"],
                 ideal_add=100 / (r["backends"] + 1), moved_remove=100 * r["moved_remove"],
                 moved_add=100 * r["moved_add"])
        cells.append([fmt.format(r[key]) if key in r else "-" for _, key, fmt in COLUMNS])
    head = [h for h, _, _ in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)) for c in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for n in (int(x) for x in args.backends.split(",") if x.strip()):
        t0 = time.perf_counter()
        rows.append(measure(n, args))
        print(f"# N={n}: measured in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(render(rows, args.markdown))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
