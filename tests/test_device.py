"""Devices, precision and one GPU per worker: ``capfilt.device``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from capfilt import device as devices


def test_auto_is_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.pick_device(None) == devices.pick_device("auto") == torch.device("cpu")
    assert devices.pick_device("cuda") == torch.device("cpu")  # asked for, absent: CPU with a warning
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.pick_device("auto") == torch.device("cuda")
    assert devices.pick_device("cpu") == torch.device("cpu")


def test_precision_per_device(monkeypatch):
    cpu = torch.device("cpu")
    assert devices.autocast_dtype(cpu, "fp32") is None
    assert devices.autocast_dtype(cpu, "bf16") is torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.precision_name(cpu) == "fp32"  # emulated bf16 is slower than fp32
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.precision_name(cpu) == "bf16"
    with devices.autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
    with devices.autocast(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32
    with pytest.raises(ValueError, match="precision"):
        devices.autocast_dtype(cpu, "int8")


def test_slots_are_distinct_while_held_and_reused_after(tmp_path):
    first, second = devices.claim_slot(tmp_path), devices.claim_slot(tmp_path)
    assert (first.index, second.index) == (0, 1)
    first.release()
    again = devices.claim_slot(tmp_path)
    assert again.index == 0
    again.release()
    second.release()


def test_a_slot_held_by_another_process_is_skipped_and_freed_when_it_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from capfilt.device import claim_slot; "
         f"s = claim_slot({str(tmp_path)!r}); print(s.index, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        mine = devices.claim_slot(tmp_path)
        assert mine.index == 1
        mine.release()
    finally:
        holder.kill()
        holder.wait()
    freed = devices.claim_slot(tmp_path)  # the kernel dropped the dead process's lock
    assert freed.index == 0
    freed.release()


def test_workers_of_a_node_spread_over_its_gpus(tmp_path, monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    placed = [devices.worker_device("auto", tmp_path) for _ in range(3)]
    assert [str(d) for d, _ in placed] == ["cuda:0", "cuda:1", "cuda:0"]  # worker i on GPU i mod 2
    assert chosen == [d for d, _ in placed]
    assert devices.worker_device("cuda:1", tmp_path) == (torch.device("cuda:1"), None)  # pinned: no slot
    assert devices.worker_device("cpu", tmp_path) == (torch.device("cpu"), None)
    for _, slot in placed:
        slot.release()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.worker_device("cuda", tmp_path) == (torch.device("cuda", 0), None)  # one GPU: no slot needed
