"""`devices` names each rank's host address only when the ranks span several hosts (trainer/loop.py)."""

from __future__ import annotations

from trainer.loop import _with_addresses


def test_one_host_keeps_the_devices_as_they_are() -> None:
    devices = ["cpu (1 threads, no native bf16) AMD EPYC"] * 2
    assert _with_addresses(devices, ["10.0.0.2", "10.0.0.2"]) == devices
    assert _with_addresses(["cuda:0 NVIDIA H100"], ["10.0.0.2"]) == ["cuda:0 NVIDIA H100"]


def test_several_hosts_add_each_ranks_address() -> None:
    assert _with_addresses(["cuda:0 A10G", "cuda:0 A10G"], ["10.0.0.2", "10.0.0.3"]) == [
        "cuda:0 A10G on 10.0.0.2",
        "cuda:0 A10G on 10.0.0.3",
    ]
