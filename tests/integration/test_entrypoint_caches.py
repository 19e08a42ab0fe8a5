"""The image's HOME and caches, per user: docker/entrypoint.sh moves each one that still holds the image's shared
/tmp default (docker/Dockerfile, ENV) under ${TMPDIR:-/tmp}/lowmem-<uid>, because Apptainer binds the host's
/tmp, which every user of a node shares. Fast: stand-in trainers record the environment they were given.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.integration.stand_ins import ENTRYPOINT, FAKE_TRAINER, ROOT, entrypoint, install, trainer_env


def image_defaults() -> dict[str, str]:
    """The Dockerfile's ENV values under /tmp (HOME and the caches every uid writes)."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    found = dict(re.findall(r"^\s*(?:ENV\s+)?([A-Z_]+)=(/tmp\S*?)\s*\\?$", text, re.M))
    assert {"HOME", "XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR"} <= set(found), found  # the parse found the block
    return found


def test_every_shared_default_of_the_image_moves_under_a_folder_of_the_user(stand_ins, tmp_path):
    env, log = stand_ins
    defaults = image_defaults()
    result = entrypoint(env, "train", NUM_PROCESSES="2", **{**defaults, "HF_HOME": "/data/hf"})
    assert result.returncode == 0, result.stderr
    own = tmp_path / f"lowmem-{os.getuid()}"
    for rank in ("0", "1"):
        seen = trainer_env(log, rank)
        for name, shared in defaults.items():
            if name != "HF_HOME":
                assert seen[name] == f"{own}{shared[len('/tmp'):]}", name
        assert seen["HF_HOME"] == "/data/hf"  # the user's own choice stays
    assert stat.S_IMODE(own.stat().st_mode) == 0o700


def test_a_cache_elsewhere_is_left_alone(stand_ins):
    env, log = stand_ins
    result = entrypoint(env, "estimate", HOME="/home/someone", XDG_CACHE_HOME="/scratch/someone/.cache")
    assert result.returncode == 0, result.stderr
    seen = trainer_env(log)
    assert (seen["HOME"], seen["XDG_CACHE_HOME"]) == ("/home/someone", "/scratch/someone/.cache")


@pytest.mark.skipif(os.geteuid() != 0, reason="running the entrypoint as other uids needs root")
def test_users_sharing_one_tmp_get_folders_of_their_own(tmp_path):
    """Two uids that have no account in the image (docker run --user, runAsUser) under one shared, sticky /tmp,
    as Apptainer gives them; a third whose folder another user made first is refused in one line; a fourth whose
    TMPDIR the container does not have falls back to /tmp."""
    shared = Path(tempfile.mkdtemp(prefix="lowmem-shared-tmp-", dir="/tmp"))  # pytest's tmp_path is root's alone
    try:
        shared.chmod(0o1777)
        install(shared / "bin", sys.executable, **{"lowmem-train": FAKE_TRAINER})
        squatted = shared / "lowmem-12347"
        squatted.mkdir()
        os.chown(squatted, 12345, 12345)
        results = {}
        for uid in (12345, 12346, 12347):
            log = shared / f"log-{uid}"
            log.mkdir(mode=0o777)
            log.chmod(0o777)
            env = {"PATH": f"{shared / 'bin'}:/usr/bin:/bin", "FAKE_LOG": str(log), "TMPDIR": str(shared),
                   **image_defaults()}
            results[uid] = subprocess.run(["sh", str(ENTRYPOINT), "estimate"], env=env, capture_output=True,
                                          text=True, timeout=60, user=uid, group=uid, extra_groups=[])
        for uid in (12345, 12346):
            assert results[uid].returncode == 0, results[uid].stderr
            own = shared / f"lowmem-{uid}"
            assert trainer_env(shared / f"log-{uid}")["XDG_CACHE_HOME"] == f"{own}/.cache"
            assert (own.stat().st_uid, stat.S_IMODE(own.stat().st_mode)) == (uid, 0o700)
        assert results[12347].returncode == 2
        assert results[12347].stderr.strip() == (f"entrypoint: cannot make {squatted}, this user's cache folder "
                                                 "(another user's?); set TMPDIR to a folder of yours")
        assert not (shared / "log-12347" / "trainer-none.env").exists()

        # a TMPDIR the container does not have (the host's, passed through): /tmp instead
        log = shared / "log-12348"
        log.mkdir()
        log.chmod(0o777)
        env = {"PATH": f"{shared / 'bin'}:/usr/bin:/bin", "FAKE_LOG": str(log), "TMPDIR": "/nonexistent/job-tmp",
               **image_defaults()}
        result = subprocess.run(["sh", str(ENTRYPOINT), "estimate"], env=env, capture_output=True, text=True,
                                timeout=60, user=12348, group=12348, extra_groups=[])
        assert result.returncode == 0, result.stderr
        assert trainer_env(log)["HOME"] == "/tmp/lowmem-12348"
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree("/tmp/lowmem-12348", ignore_errors=True)
