"""The training commands re-execute themselves with tcmalloc preloaded where the system has it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from rlhf.scale import allocator
from rlhf.errors import UserError

pytestmark = [pytest.mark.fast, pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")]


def test_auto_preloads_the_library_found_once(tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    assert allocator.find_tcmalloc((str(tmp_path),)) == str(lib)
    assert allocator.find_tcmalloc((str(tmp_path / "none"),)) is None

    env = allocator.preload_env({"LD_PRELOAD": "/opt/other.so"}, str(lib))
    assert env["LD_PRELOAD"] == f"{lib}:/opt/other.so" and env[allocator.ENV] == str(lib)
    assert allocator.preload_env(env, str(lib)) is None  # the re-executed process goes on
    assert allocator.preload_env({"LD_PRELOAD": "/x/libtcmalloc.so.4"}, str(lib)) is None  # the user's own
    assert allocator.preload_env({}, None) is None  # nothing found: glibc's malloc
    assert allocator.preload_env({allocator.ENV: "system"}, str(lib)) is None


def test_an_explicit_library_is_preloaded_and_a_missing_one_refused(tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    assert allocator.preload_env({allocator.ENV: str(lib)}, None)["LD_PRELOAD"] == str(lib)
    with pytest.raises(UserError, match="no such file"):
        allocator.preload_env({allocator.ENV: str(tmp_path / "nope.so")}, None)
    env = {**os.environ, allocator.ENV: str(tmp_path / "nope.so")}
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "ppo", "--recipe", "x.yaml"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {allocator.ENV}={tmp_path / 'nope.so'}: no such file (auto, system, or the path of an allocator "
        "library)"]


def _fake_library(tmp_path, name: str) -> str:
    """A harmless real shared library (glibc's libdl stub, or libm) under an allocator's file name."""
    import shutil

    for source in ("/usr/lib/x86_64-linux-gnu/libdl.so.2", "/usr/lib/aarch64-linux-gnu/libdl.so.2",
                   "/lib64/libdl.so.2", "/usr/lib/x86_64-linux-gnu/libm.so.6"):
        if os.path.isfile(source):
            shutil.copy(source, tmp_path / name)
            return str(tmp_path / name)
    pytest.skip("no small shared library to preload")


def _allocator_of_a_process(env: dict) -> str:
    code = "from rlhf.scale import allocator; print(allocator.current())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True)
    return proc.stdout.strip()


def test_the_process_knows_its_allocator_from_its_own_mappings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert _allocator_of_a_process(env) == "system"
    for name, expected in (("libjemalloc.so.2", "jemalloc"), ("libtcmalloc_minimal.so.4", "tcmalloc")):
        assert _allocator_of_a_process({**env, "LD_PRELOAD": _fake_library(tmp_path, name)}) == expected


def test_an_explicit_library_is_what_the_reexecuted_command_runs_on(tmp_path):
    """``RLHF_ALLOCATOR=PATH``: the command re-executes itself with that library mapped into the process."""
    lib = _fake_library(tmp_path, "libjemalloc.so.2")
    env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, allocator.ENV: lib}
    code = "from rlhf.scale import allocator; allocator.reexec_with_preload(['--probe']); print('not re-executed')"
    # the re-execution runs `python -m rlhf.cli --probe`: here a cli that prints what the new process runs on
    probe = tmp_path / "probe"
    (probe / "rlhf").mkdir(parents=True)
    (probe / "rlhf" / "cli.py").write_text("from rlhf.scale import allocator\nprint(allocator.current())\n")
    (probe / "rlhf" / "__init__.py").write_text(
        f"__path__.append({str(ROOT / 'rlhf')!r})\n")  # the package's own modules beside that cli
    proc = subprocess.run([sys.executable, "-c", code], cwd=probe, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "jemalloc"
