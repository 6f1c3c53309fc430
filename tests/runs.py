"""Helpers of the test files about training runs (test_resume, test_bad_input, test_save_folder,
test_many_classes, test_bad_images): start train.py and wait for a moment in it, call a script's main()
in this process, read its one-line errors. Their fixtures (data, run_dir, saved, small,
test_script) are in conftest.py."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def popen(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.001) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended (exit {proc.returncode}) before the moment to stop it:\n"
                                 f"{proc.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to stop train.py")
        time.sleep(poll)


def call(main, prog: str, args, capsys) -> tuple[int, str]:
    """Run a script's main() in this process as `prog args`; (exit code, stderr)."""
    old = sys.argv
    sys.argv = [prog, *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]  # stderr also holds the progress bar
