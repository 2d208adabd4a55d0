"""A multi-process run whose peers never join fails with one error line, not a silent wait or
a C++ abort."""

import socket
import subprocess
import sys

import trainer_helpers as h


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_missing_peer_is_one_error_line_and_exit_2(tmp_path):
    argv = [
        sys.executable,
        str(h.REPO / "train.py"),
        f"--config={h.REPO / 'configs' / 'swissroll.py'}",
        f"--workdir={tmp_path / 'run'}",
        f"--coordinator_address=127.0.0.1:{_free_port()}",
        "--num_processes=2",
        "--process_id=0",
        "--distributed_timeout=3",
    ]
    result = subprocess.run(
        argv, env=h.subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "process 0 of 2 could not form the group" in errors[0]
    assert "--distributed_timeout" in errors[0] and "--coordinator_address" in errors[0]
    assert "Check failure" not in result.stderr and "Traceback" not in result.stderr
    # It said what it was waiting for, so the wait was never silent.
    assert "waiting for 2 processes at 127.0.0.1" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was written
