"""``make mutate``: mutation testing of the modules the study's numbers rest on.

    python tests/mutation/mutate.py [--module NAME ...] [--max-per-module N] [--seed S]
                                    [--timeout SECONDS] [--list] [--out DIR]

For each target module (``TARGETS``, or those whose path contains a --module NAME) it makes the AST
mutants of ``mutants.py`` (operator swaps, and/or, negated conditions, 0 <-> 1 and off-by-one
constants, sign flips, swapped arguments), draws a fixed sample of at most --max-per-module of them
(seeded by --seed), and applies them one at a time to the source file, in place. Each mutant runs
the module's tests with ``pytest -x -q`` under a per-mutant timeout (default three times the clean
run, at least a minute); the file is restored after each mutant, also on an error, Ctrl-C or
SIGTERM. A mutant is killed when a test fails or the run times out, and survives when every test
passes: a gap in the tests, or an equivalent mutant that no test could tell apart.

It prints one line per mutant (outcome, module:line, the change, the first failing test) and the
survival rate per module, and writes the same to ``<out>/<UTC time>.json`` (default
``runs/mutation``). ``--list`` prints the targets, their tests and the sampled mutants, and runs
nothing.

Because it edits sources in place it refuses to start while a target module has uncommitted
changes, and stops when a target changes under it. The tests import the package from this work
tree (PYTHONPATH) and write no bytecode (a restored file could otherwise meet a cached mutant of
the same size and second). A module whose tests fail before any mutation is skipped. The default
sample keeps a whole run under about 40 minutes on two cores; one pytest start per mutant makes
it too slow for ``make test``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from mutants import mutants

ROOT = Path(__file__).resolve().parents[2]

# source modules (globs from the repository root) -> the tests that cover them besides their mirror
# tests/<layer>/test_<stem>*.py; the study's driver is split into config, phases and the driver
TARGETS = {
    "diffcirc/ops/backward.py": ["tests/ops/test_autograd.py", "tests/processor/test_attribution.py"],
    # the session's gates are driven by head_attribution, its label maps traced by the recorder tests
    "diffcirc/processor/session.py": ["tests/processor/test_processor.py", "tests/processor/test_interventions.py",
                                      "tests/processor/test_attribution.py", "tests/processor/test_recorder.py",
                                      "tests/processor/test_supported.py"],
    "diffcirc/processor/masks.py": ["tests/processor/test_compile.py", "tests/processor/test_processor.py"],
    "diffcirc/processor/recorder*.py": ["tests/processor/test_recorder*.py"],
    "diffcirc/processor/aggregates.py": ["tests/processor/test_recorder*.py"],
    # the transformer models' counterparts are checked against diffusers' processors there
    "diffcirc/processor/counterparts.py": ["tests/processor/test_transformer_models.py",
                                           "tests/processor/test_compile.py"],
    "diffcirc/processor/heatmaps.py": [],
    "diffcirc/processor/grid.py": ["tests/processor/test_session.py", "tests/processor/test_recorder.py"],
    # the pipelines' end-to-end runs (latents, prompts, flow matching, resumption) drive them too
    "diffcirc/analysis/config.py": ["tests/analysis/test_driver.py", "tests/cli/test_analyze_pipelines.py"],
    "diffcirc/analysis/phases*.py": ["tests/analysis/test_driver.py", "tests/cli/test_analyze_pipelines.py"],
    "diffcirc/analysis/driver.py": ["tests/analysis/test_driver.py", "tests/cli/test_analyze_pipelines.py"],
    "diffcirc/analysis/metrics.py": [],
    "diffcirc/analysis/roles.py": [],
    "diffcirc/analysis/image_maps.py": ["tests/analysis/test_roles.py"],
}


def targets() -> dict:
    """{module path: [test files]} (relative to ROOT) for every target that exists."""
    found = {}
    for pattern, extra in TARGETS.items():
        for module in sorted(glob.glob(pattern, root_dir=ROOT)):
            layer, stem = Path(module).parent.name, Path(module).stem
            tests = {t for p in [f"tests/{layer}/test_{stem}*.py", *extra] for t in glob.glob(p, root_dir=ROOT)}
            found[module] = sorted(tests)
    return found


def uncommitted(modules) -> list:
    out = subprocess.run(["git", "status", "--porcelain", "--", *modules], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return out.splitlines()


def run_tests(tests, timeout):
    """(outcome, seconds, first failing test): "pass", "fail" or "timeout"."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    # a session of its own, so a timeout ends pytest and whatever it started (distributed workers)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.monotonic() - start, ""
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    first = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return ("pass" if proc.returncode == 0 else "fail"), time.monotonic() - start, first.group(1) if first else ""


def sample(found: list, n: int, seed: int, module: str) -> list:
    if len(found) <= n:
        return found
    chosen = random.Random(f"{seed}:{module}").sample(range(len(found)), n)  # the same draw on every run
    return [found[i] for i in sorted(chosen)]


def restore(path: Path, original: str) -> None:
    """Writes original back with Ctrl-C and SIGTERM held off, so a second one cannot cut it short."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        path.write_text(original)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def mutate_module(module, tests, chosen, timeout, report) -> dict:
    path = ROOT / module
    original = path.read_text()
    outcome, seconds, first = run_tests(tests, None)
    if outcome != "pass":
        report(f"skipped  {module}: its tests fail before any mutation ({first})")
        return {"module": module, "tests": tests, "skipped": f"tests fail unmutated: {first}", "mutants": []}
    limit = timeout or max(60.0, 3 * seconds)
    rows = []
    for m in chosen:
        if path.read_text() != original:
            raise SystemExit(f"{module} changed while being mutated; stopping (its last mutant is not applied)")
        try:
            path.write_text(m.apply(original))
            outcome, seconds, first = run_tests(tests, limit)
        finally:
            restore(path, original)
        status = {"pass": "survived", "fail": "killed", "timeout": "killed"}[outcome]
        note = "timeout" if outcome == "timeout" else first
        report(f"{status:<9}{module}:{m.line:<5} {m.kind:<11} {m.describe()}  {note}")
        rows.append({"line": m.line, "col": m.col, "kind": m.kind, "before": m.before, "after": m.after,
                     "status": status, "timeout": outcome == "timeout", "caught_by": first, "seconds": round(seconds, 1)})
    killed = sum(r["status"] == "killed" for r in rows)
    return {"module": module, "tests": tests, "timeout_s": limit, "mutants": rows, "killed": killed,
            "survived": len(rows) - killed, "survival_rate": (len(rows) - killed) / len(rows) if rows else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--module", action="append", default=[], help="only targets whose path contains this (repeatable)")
    parser.add_argument("--max-per-module", type=int, default=6, help="mutants sampled per module (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per mutant (default 3x the clean run, >= 60)")
    parser.add_argument("--list", action="store_true", help="print targets, tests and sampled mutants; run nothing")
    parser.add_argument("--out", default="runs/mutation", help="results folder (default runs/mutation)")
    args = parser.parse_args(argv)
    if args.max_per_module < 1:
        parser.error(f"--max-per-module must be >= 1, got {args.max_per_module}")

    chosen = {m: t for m, t in targets().items() if not args.module or any(s in m for s in args.module)}
    if not chosen:
        parser.error(f"no target module matches {args.module}; targets: {sorted(targets())}")
    plan = {}
    for module, tests in chosen.items():
        found = mutants(module, (ROOT / module).read_text())
        plan[module] = (tests, found, sample(found, args.max_per_module, args.seed, module))
    if args.list:
        for module, (tests, found, picked) in plan.items():
            print(f"{module}: {len(found)} mutants, {len(picked)} sampled; tests: {' '.join(tests) or 'none'}")
            for m in picked:
                print(f"    {m.line:<5} {m.kind:<11} {m.describe()}")
        return 0
    dirty = uncommitted(list(plan))
    if dirty:
        print("refusing to mutate modules with uncommitted changes (it edits them in place):\n  " + "\n  ".join(dirty),
              file=sys.stderr)
        return 2

    # SIGTERM and SIGHUP unwind like Ctrl-C, so the finally blocks put every source back; SIGINT too,
    # also where it was inherited ignored (started in the background)
    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = []
    try:
        for module, (tests, found, picked) in plan.items():
            if not tests:
                print(f"skipped  {module}: no tests map to it", flush=True)
                continue
            result = mutate_module(module, tests, picked, args.timeout, lambda line: print(line, flush=True))
            results.append({**result, "mutants_total": len(found)})
    except KeyboardInterrupt as stopped:
        print(f"\nstopped ({stopped or 'Ctrl-C'}); every source is restored, nothing written", file=sys.stderr)
        return 130

    print("\nsurvival per module (survived / sampled):")
    for r in results:
        if r["mutants"]:
            print(f"  {r['module']:<40} {r['survived']:>3} / {len(r['mutants']):<3} = {r['survival_rate']:.0%}"
                  f"   killed {r['killed']}, of {r['mutants_total']} mutants")
    out = ROOT / args.out / f"{started:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"started": started.isoformat(), "seed": args.seed,
                               "max_per_module": args.max_per_module, "modules": results}, indent=2) + "\n")
    tmp.replace(out)  # whole or absent
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
