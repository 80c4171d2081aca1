"""One training per output_dir: a second one is refused naming the first, a killed one's lock is taken over,
and the lock comes and goes with the run (training/run_lock.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_scripts.checks import check_before_training
from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.errors import UserError
from lora_scripts.training import loop, run_lock
from lora_scripts.training.run_lock import LOCK_FILE_NAME, RunLock, lock_status, output_dir_lock
from tests.training.conftest import tiny_run_settings, write_config
from tests.training.test_output_dir import earlier_run, tree

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A process that takes the lock on argv[1], says so, and holds it until its stdin closes (or it is killed).
HOLD_LOCK = (
    "import sys\n"
    "from lora_scripts.training.run_lock import RunLock\n"
    "lock = RunLock(sys.argv[1])\n"
    "lock.acquire()\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
    "lock.release()\n"
)


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Another process holding the lock on `tmp_path/out` (an earlier run already there)."""
    out = earlier_run(tmp_path / "out")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc, out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def config_file(tmp_path: Path, data: Path, model: Path, out: Path, **values: object) -> Path:
    return write_config(tmp_path / "c.yaml", **tiny_run_settings(data, model, output_dir=str(out), **values))


def holder_of(out: Path) -> dict:
    return json.loads((out / LOCK_FILE_NAME).read_text(encoding="utf-8"))


def in_use_message(out: Path, holder: dict) -> str:
    return (
        f"output_dir: '{out}' is in use by another training (pid {holder['pid']} on host '{holder['host']}', "
        f"started {holder['started']}, command: {holder['command']}); wait for it to end or stop it, or "
        f"choose another output_dir (its lock file is '{out / LOCK_FILE_NAME}')."
    )


def no_model(*args: object, **kwargs: object) -> None:
    raise AssertionError("the base model was loaded")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def write_lock(out: Path, *, pid: int, host: str | None = None) -> Path:
    """A lock file as a run writes it, held by no one (its flock is free)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "started": "2025-01-02T03:04:05+00:00",
        "command": "train.py --config c.yaml",
    }
    (out / LOCK_FILE_NAME).write_text(json.dumps(record) + "\n", encoding="utf-8")
    return out / LOCK_FILE_NAME


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the kernel hands it out again, many pids later)


# --- through `lora-scripts train` -------------------------------------------------------------------------


def test_a_second_training_is_refused_naming_the_first_and_moves_nothing(
    tmp_path: Path,
    tiny_model_dir: Path,
    dataset_dir: Path,
    lock_holder: tuple[subprocess.Popen, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proc, out = lock_holder
    cfg = config_file(tmp_path, dataset_dir, tiny_model_dir, out, overwrite=True)
    monkeypatch.setattr(loop, "load_family", no_model)
    before = tree(out)

    code = main(["train", "--config", str(cfg)])

    err = capsys.readouterr().err
    holder = holder_of(out)
    assert holder["pid"] == proc.pid
    assert code == 2 and "Traceback" not in err
    assert error_lines(err) == [f"error: {in_use_message(out, holder)}"]
    assert tree(out) == before  # overwrite: true moved nothing: the folder is the other run's

    # `check` says the same, and shows who holds it.
    assert main(["check", "--config", str(cfg), "--json"]) == 2
    facts = json.loads(capsys.readouterr().out)
    assert facts["errors"] == [in_use_message(out, holder)]
    assert facts["outputs"]["lock"] == {"file": str(out / LOCK_FILE_NAME), "state": "in_use", **holder}
    assert main(["check", "--config", str(cfg)]) == 2
    assert f"in use by another training (pid {proc.pid} on host" in capsys.readouterr().out


def test_the_lock_of_a_killed_training_is_taken_over(
    tmp_path: Path,
    tiny_model_dir: Path,
    dataset_dir: Path,
    lock_holder: tuple[subprocess.Popen, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    proc, out = lock_holder
    killed = holder_of(out)
    os.kill(proc.pid, signal.SIGKILL)  # no `finally`: the lock file stays, its flock goes with the process
    proc.wait(timeout=30)
    assert (out / LOCK_FILE_NAME).is_file()
    assert lock_status(out).state == "stale"
    cfg = config_file(tmp_path, dataset_dir, tiny_model_dir, out, overwrite=True)

    code = main(["train", "--config", str(cfg)])

    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert (
        f"output_dir: taking over the lock {out / LOCK_FILE_NAME} left by a training (pid {killed['pid']} on "
        f"host '{killed['host']}', started {killed['started']}, command: {killed['command']}) that is no "
        "longer running"
    ) in err
    assert (out / "out.safetensors").is_file()
    assert not (out / LOCK_FILE_NAME).exists()  # released at the end


def test_a_failing_training_releases_the_lock_and_leaves_no_folder(
    tmp_path: Path, tiny_model_dir: Path, dataset_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "runs" / "out"
    cfg = config_file(tmp_path, dataset_dir, tiny_model_dir, out)
    seen: list[bool] = []

    def interrupted(*args: object, **kwargs: object) -> None:
        seen.append(lock_status(out).state == "in_use")  # held while the model loads
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "load_family", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.train(load_config(cfg))
    assert seen == [True]
    assert not (tmp_path / "runs").exists()  # the lock made runs/out/ for itself, and took it away again


def test_only_the_main_process_checks_the_lock(
    tmp_path: Path, tiny_model_dir: Path, dataset_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun / accelerate launch the main process may hold the lock for this very run by the time
    another process checks the folder: only the main process (RANK 0) looks at it."""
    out = tmp_path / "out"
    cfg = config_file(tmp_path, dataset_dir, tiny_model_dir, out)
    config = load_config(cfg)
    with output_dir_lock(out):
        monkeypatch.setenv("RANK", "1")
        assert len(check_before_training(config).images) == 6
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserError) as info:
            check_before_training(config)
        assert info.value.messages == [in_use_message(out, holder_of(out))]
    with output_dir_lock(out, enabled=False) as nothing:  # the other processes of a launch
        assert nothing is None and not (out / LOCK_FILE_NAME).exists()


# --- the lock itself ----------------------------------------------------------------------------------------


def test_one_lock_per_folder_even_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    first = RunLock(out)
    first.acquire()
    holder = holder_of(out)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(UserError) as info:
        RunLock(out).acquire()  # another open file: flock refuses it even in the same process
    assert info.value.messages == [in_use_message(out, holder)]
    assert (out / LOCK_FILE_NAME).is_file()  # the refused one did not touch the holder's file
    first.release()
    first.release()  # twice is harmless
    assert not (tmp_path / "a").exists()  # a/, a/b/ and out/ were made for the lock: gone with it


def test_release_keeps_a_folder_the_run_wrote_in(tmp_path: Path) -> None:
    out = tmp_path / "a" / "out"
    with output_dir_lock(out):
        (out / "out.safetensors").write_bytes(b"lora")
    assert sorted(p.name for p in out.iterdir()) == ["out.safetensors"]


def test_a_lock_left_with_a_dead_pid_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    pid = dead_pid()
    write_lock(out, pid=pid)
    assert lock_status(out).state == "stale"
    with output_dir_lock(out):
        assert holder_of(out)["pid"] == os.getpid()
    assert f"left by a training (pid {pid} on host" in caplog.text
    (out / LOCK_FILE_NAME).write_text("", encoding="utf-8")  # killed between creating and writing it
    with output_dir_lock(out):
        assert holder_of(out)["pid"] == os.getpid()


def test_without_flock_the_pid_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where flock does not work (Windows, some network disks): a live pid on this host holds the folder."""
    monkeypatch.setattr(run_lock, "_try_flock", lambda fd, shared: None)
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(out, pid=sleeper.pid)
        with pytest.raises(UserError) as info:
            RunLock(out).acquire()
        assert f"is in use by another training (pid {sleeper.pid} on host" in info.value.messages[0]
    finally:
        sleeper.kill()
        sleeper.wait()
    write_lock(out, pid=dead_pid())
    with output_dir_lock(out):
        assert holder_of(out)["pid"] == os.getpid()


def test_a_lock_from_another_host_names_the_file_to_delete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock = write_lock(out, pid=dead_pid(), host="other-machine")
    with pytest.raises(UserError) as info:
        RunLock(out).acquire()
    holder = holder_of(out)
    assert info.value.messages == [
        f"output_dir: '{out}' is locked by a training on another machine (pid {holder['pid']} on host "
        f"'other-machine', started 2025-01-02T03:04:05+00:00, command: train.py --config c.yaml), which "
        f"cannot be checked from here; if it is no longer running, delete '{lock}' and run again, or choose "
        "another output_dir."
    ]
    assert lock.is_file()


def test_a_lock_still_held_for_a_dead_pid_says_to_wait(tmp_path: Path) -> None:
    """A killed run's forked DataLoader workers share its flock until they notice (seconds): the pid in the
    file is dead but the file is held, so the next run is asked to wait rather than told a training runs."""
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "out"
    lock = write_lock(out, pid=dead_pid())
    with open(lock, "rb") as held:  # another open file holding the flock: the orphaned worker
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError) as info:
            RunLock(out).acquire()
    (message,) = info.value.messages
    assert message.startswith(
        f"output_dir: '{out}' is still locked by a process of a training that ended (pid"
    )
    assert message.endswith(
        f"wait a few seconds and run again, or stop what that training started (its lock file is '{lock}')."
    )
    with output_dir_lock(out):  # the worker gone, the lock is taken over
        assert holder_of(out)["pid"] == os.getpid()
