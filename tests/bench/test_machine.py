"""diffcirc.bench.machine: what ran a benchmark, and the commit only from a checkout of the package."""

import shutil
import subprocess

import pytest
import torch

from diffcirc.bench import machine

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(*args, cwd):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@needs_git
def test_commit_only_at_the_top_level_of_a_checkout(tmp_path):
    repo = tmp_path / "repo"
    (repo / "site-packages").mkdir(parents=True)
    _git("init", "-q", cwd=repo)
    _git("commit", "-q", "--allow-empty", "-m", "start", cwd=repo)
    assert machine.commit(repo) == _git("rev-parse", "--short", "HEAD", cwd=repo)
    # a package installed somewhere inside another repository must not report that one's commit
    assert machine.commit(repo / "site-packages") is None
    assert machine.commit(tmp_path) is None  # not a repository at all


def test_machine_info_on_the_cpu():
    info = machine.full_machine_info("cpu")
    for key in ("machine", "cpu", "threads", "torch", "isa", "blas", "commit", "cuda", "gpu", "device"):
        assert key in info, key
    assert info["device"] == "cpu" and info["gpu"] is None
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()


def test_fused_path_warning_without_the_extension(monkeypatch):
    monkeypatch.setattr(machine.extension, "load", lambda: None)
    assert "not built" in machine.fused_path_warning("cpu") and "float64 reference" in machine.fused_path_warning("cuda")

    class CpuOnly:
        @staticmethod
        def cuda_archs():
            return []

    monkeypatch.setattr(machine.extension, "load", lambda: CpuOnly())
    assert machine.fused_path_warning("cpu") is None
    assert "no CUDA kernels" in machine.fused_path_warning("cuda")
