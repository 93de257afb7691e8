"""The installed-wheel check (``make wheel-check``, run in CI): ``diffcirc bench sweep --quick`` and
``diffcirc bench unet --quick`` from a wheel installed into a fresh virtual environment outside the
checkout, run from a folder outside it, so that nothing can come from the source tree.

The wheel is CPU-only (DIFFCIRC_CUDA=0) and built from a copy of the files git sees (tracked and
untracked, not ignored), not from the checkout, whose build/ may hold modules deleted since. The
fresh environment takes its dependencies (torch, diffusers, ...) from the checkout's venv through a
.pth file instead of installing them again; the editable diffcirc installed there stays unseen,
since a .pth line adds a folder to sys.path without running the .pth files inside it, which is how
an editable install hooks itself in.

    python benchmarks/wheel_check.py [--python .venv/bin/python]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["bench", "sweep", "--quick"], ["bench", "unet", "--quick"])
# run in the fresh environment from a folder outside the checkout: where diffcirc and its kernels come from
WHERE_FROM = """
import sys
from pathlib import Path

import diffcirc
from diffcirc.ops import extension

venv = Path(sys.argv[1]).resolve()
assert Path(diffcirc.__file__).resolve().is_relative_to(venv), f"diffcirc imported from {diffcirc.__file__}"
assert extension.load() is not None, "the wheel's diffcirc._C does not load"
print(f"diffcirc {diffcirc.__file__} with {extension.load().cpu_isa()} kernels")
"""


def run(*command, **kwargs):
    shown = ("<script>" if "\n" in str(c) else str(c) for c in command)  # WHERE_FROM is not echoed whole
    print("+ " + " ".join(shown), flush=True)
    subprocess.run([str(c) for c in command], check=True, **kwargs)


def source_copy(dest: Path):
    """The checkout's files as git sees them, with their working-tree contents, copied into dest."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def site_packages(python) -> list:
    """The interpreter's purelib and platlib folders (one folder where they coincide)."""
    code = "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])"
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return list(dict.fromkeys(out.stdout.split()))


def check(python: Path, work: Path):
    source = work / "source"
    source_copy(source)
    run(python, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", work / "dist", source,
        env={**os.environ, "DIFFCIRC_CUDA": "0"})
    (wheel,) = (work / "dist").glob("diffcirc-*.whl")
    venv = work / "venv"
    run(python, "-m", "venv", "--without-pip", venv)
    fresh = venv / "bin" / "python"
    (Path(site_packages(fresh)[0]) / "diffcirc_dependencies.pth").write_text("\n".join(site_packages(python)) + "\n")
    run(python, "-m", "pip", "--python", fresh, "install", "-q", "--no-deps", "--no-index", wheel)
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    run(fresh, "-c", WHERE_FROM, venv, cwd=elsewhere)
    for command in COMMANDS:
        out = elsewhere / command[1]
        run(venv / "bin" / "diffcirc", *command, "--threads", "1", "--out", out, cwd=elsewhere)
        data = json.loads((out / "results.json").read_text())
        assert data["results"], f"{' '.join(command)}: no results"
        assert data["meta"]["commit"] is None, "an installed package reported a commit"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", type=Path, default=ROOT / ".venv" / "bin" / "python",
                   help="the checkout's venv interpreter: it builds the wheel and lends its dependencies")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="diffcirc-wheel-check-") as work:
        check(args.python.absolute(), Path(work))
    print("wheel-check: the installed wheel ran " + " and ".join(f"`diffcirc {' '.join(c)}`" for c in COMMANDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
