"""The training commands re-execute themselves with tcmalloc preloaded where the system has it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from rlhf import allocator
from rlhf.errors import UserError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")


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


def test_the_process_knows_its_allocator():
    expected = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else None
    assert allocator.current() in ("tcmalloc", "jemalloc", "system")
    assert expected is None or allocator.current() == expected
