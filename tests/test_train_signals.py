"""`capfilt train` stopped by SIGINT (Ctrl-C) or SIGTERM: a checkpoint of the step reached, one line, the shell's
status, and a rerun of the same command resumes from that step."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from capfilt.models.checkpointing import latest_checkpoint, read_checkpoint
from capfilt.shapes.writer import write_split

CAPFILT = Path(sys.executable).parent / "capfilt"  # the console script a user runs, next to this Python
STOPPED = re.compile(r"capfilt train: stopped by (SIG\w+) at step (\d+): checkpoint (\S+) saved; "
                     r"rerun the same command to resume")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """48 shapes-world pairs in two shards: 6 steps an epoch at the tiny preset's batch of 8."""
    folder = tmp_path_factory.mktemp("human")
    write_split("human", 48, 0, folder, shard_size=24)
    return folder


def _command(data: Path, out: Path, max_steps: int) -> list[str]:
    # --checkpoint-every and --log-every beyond the run: what is saved and logged comes from the signal and the
    # first steps' lines alone.
    return [str(CAPFILT), "train", "pretrain", "--model", "tiny", "--data", str(data), "--out", str(out),
            "--image-size", "32", "--queue-size", "16", "--workers", "1", "--device", "cpu", "--epochs", "100000",
            "--max-steps", str(max_steps), "--checkpoint-every", "100000", "--log-every", "100000"]


def _environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_reached_and_the_rerun_resumes_from_it(tmp_path, shapes, signum):
    out = tmp_path / "run"
    # A session of its own: SIGINT goes to the whole process group, as a terminal's Ctrl-C does.
    process = subprocess.Popen(_command(shapes, out, 100000), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=_environment(), start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    seen = []
    try:
        while not any(" step 1/" in line for line in seen):  # it trains: its first step is logged
            line = lines.get(timeout=300)
            assert line is not None, "the run ended before its first step:\n" + "".join(seen)
            seen.append(line)
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        status = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    while (line := lines.get(timeout=60)) is not None:
        seen.append(line)
    output = "".join(seen)
    assert status == 128 + signum, output
    assert "Traceback" not in output
    said = [line for line in seen if "rerun the same command" in line]
    assert len(said) == 1 and said[0] == seen[-1], output
    name, step, folder = STOPPED.fullmatch(said[0].strip()).groups()
    step, folder = int(step), Path(folder)
    assert name == signal.Signals(signum).name and step >= 1
    # The one checkpoint on disk is whole and of the step said.
    assert latest_checkpoint(out) == folder and not list(folder.parent.glob("*.partial"))
    assert read_checkpoint(folder)["state"]["step"] == step

    rerun = subprocess.run(_command(shapes, out, step + 2), capture_output=True, text=True, env=_environment(),
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {folder} (step {step}," in rerun.stderr
    assert read_checkpoint(latest_checkpoint(out))["state"]["step"] == step + 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [step, step + 2]  # the stop's record, then the end's
