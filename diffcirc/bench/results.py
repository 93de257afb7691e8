"""Results files and comparing runs: results.json (the machine, the run's arguments and one row per
case x implementation) and results.csv (the rows), both written atomically through
diffcirc.files; per-case change of a new run against an old one."""

from __future__ import annotations

import csv
import json
import os

from diffcirc import files

# the fields that name a case: rows of two runs with equal values of these are the same case
KEY_FIELDS = ("case", "dtype", "b", "h", "n", "d", "conditions", "images", "max_batch", "implementation")
CSV_FIELDS = ("case", "implementation", "dtype", "b", "h", "n", "d", "conditions", "images", "max_batch", "ms",
              "ms_min", "ms_max", "gflops", "vs_sdpa", "peak_extra_bytes", "max_abs_err", "skipped")


def write_json(path, meta: dict, rows: list, **extra) -> str:
    """{"meta": meta, "results": rows, **extra} as JSON at path; returns path."""
    files.write_json({"meta": meta, "results": rows, **extra}, path)
    return str(path)


def write_csv(path, rows: list) -> str:
    """One line per result; the columns of CSV_FIELDS first, then any others in first-seen order
    (nested values left out); returns path."""
    fields = [k for k in CSV_FIELDS if any(k in r for r in rows)]
    fields += [k for r in rows for k in r if k not in fields and not isinstance(r[k], (dict, list))]
    fields = list(dict.fromkeys(fields))
    with files.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def write_results(out_dir, meta: dict, rows: list, **extra) -> list:
    """results.json and results.csv in out_dir (created if missing); returns their paths."""
    return [write_json(os.path.join(out_dir, "results.json"), meta, rows, **extra),
            write_csv(os.path.join(out_dir, "results.csv"), rows)]


def read_rows(path) -> list:
    """The result rows of a results.json."""
    with open(path) as f:
        return json.load(f)["results"]


def case_key(row: dict) -> tuple:
    return tuple((k, row[k]) for k in KEY_FIELDS if k in row)


def compare(old_rows: list, new_rows: list, threshold_pct: float = 10.0) -> list:
    """Per case present in both runs (and timed in both): old and new median ms, change in % and
    whether it slowed down by more than threshold_pct."""
    old = {case_key(r): r for r in old_rows if r.get("ms") is not None}
    out = []
    for r in new_rows:
        o = old.get(case_key(r))
        if o is None or r.get("ms") is None:
            continue
        change = (r["ms"] - o["ms"]) / o["ms"] * 100.0
        out.append({"key": dict(case_key(r)), "old_ms": o["ms"], "new_ms": r["ms"], "change_pct": change,
                    "regressed": change > threshold_pct})
    return out
