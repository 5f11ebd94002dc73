"""One run per step folder: a second run is refused with the owner's pid, stale locks are reported."""
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from continual.run_lock import LOCK_NAME, RunLock, RunLockedError


def _finished_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path):
    first = RunLock(str(tmp_path)).acquire()
    owner = json.loads((tmp_path / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunLockedError) as err:
        RunLock(str(tmp_path)).acquire()
    assert str(os.getpid()) in str(err.value) and str(tmp_path) in str(err.value)
    assert "another NAME or OUTPUT_DIR" in str(err.value)
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(str(tmp_path)):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path, caplog):
    dead = _finished_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x"}))
    with caplog.at_level(logging.WARNING):
        lock = RunLock(str(tmp_path)).acquire()
    assert f"stale lock of process {dead}" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_of_another_host_says_how_to_remove_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunLockedError, match="delete .*run.lock"):
        RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere"
