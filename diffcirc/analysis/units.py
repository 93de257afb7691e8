"""Resumable work units of an analysis folder.

Each phase of the driver is a unit: when it finishes, its tables (already written atomically) are
recorded in ``manifest.json`` with a SHA-256 of their contents, beside a fingerprint of the run's
configuration. A unit also records the checksums of the units it read. Rerunning the same
command on the same folder skips every unit whose files are present and intact, redoes a unit
whose file is missing, truncated or altered, redoes every unit that read a redone unit (its inputs
changed), and refuses a folder made with a different configuration.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import InputError
from ..files import write_json


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


class ConfigMismatchError(InputError):
    """The output folder holds results of another configuration."""


class WorkUnits:
    """The manifest of one output folder. config: what the results depend on (JSON-serialisable)."""

    def __init__(self, out, config: dict):
        self.out = Path(out)
        self.path = self.out / "manifest.json"
        self.config_sha256 = fingerprint(config)
        self.units: dict = {}
        if self.path.exists():
            try:
                manifest = json.loads(self.path.read_text())
            except (OSError, ValueError):
                manifest = None  # an unreadable manifest vouches for nothing: every unit is redone
            if isinstance(manifest, dict):
                if manifest.get("config_sha256") != self.config_sha256:
                    raise ConfigMismatchError(
                        f"{self.out} holds results of a different configuration (manifest.json); "
                        "rerun with the same options, or choose a new --out")
                units = manifest.get("units")
                # only well-formed entries count; an old or foreign entry is redone, never trusted
                self.units = {name: entry for name, entry in units.items()
                              if isinstance(entry, dict) and isinstance(entry.get("files"), dict)
                              and isinstance(entry.get("inputs", {}), dict)} if isinstance(units, dict) else {}

    def done(self, name: str) -> bool:
        """Whether unit ``name`` finished, every file it wrote is intact, and the units it read are
        still the ones it read."""
        entry = self.units.get(name)
        if not entry or not entry.get("files"):
            return False
        for rel, digest in entry["files"].items():
            path = self.out / rel
            if not path.is_file() or _sha256(path) != digest:
                return False
        return all(self.units.get(dep, {}).get("files") == files for dep, files in entry.get("inputs", {}).items())

    def finish(self, name: str, files, inputs=()) -> None:
        """Records unit ``name`` as finished with these files (relative to the folder), having read
        the finished units ``inputs``."""
        self.units[name] = {"files": {str(rel): _sha256(self.out / rel) for rel in files},
                            "inputs": {dep: self.units[dep]["files"] for dep in inputs}}
        write_json({"config_sha256": self.config_sha256, "units": self.units}, self.path)
