"""The benchmark scripts' Ray-free pieces on CPU (bench/gpu_check.sh runs them for real on a GPU machine)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from tests.trainer.cifar_files import write_cifar_python
from trainer.spec import resolve

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_without_ray_trains_through_the_step_functions(tmp_path):
    throughput = load_script("throughput")
    data = write_cifar_python(tmp_path / "cifar", per_batch=20)
    spec = resolve(
        "debug",
        {
            "data.train": str(data),
            "optim.epochs": 2,
            "optim.batch_size": 16,
            "data.max_train_images": 64,
            "scaling.num_workers": 1,
        },
    )
    result = throughput.without_ray(spec, torch.device("cpu"))
    assert result["images_per_s"] > 0 and result["devices"][0].startswith("cpu (")
    assert result["numerics"]["precision"] == "fp32" and result["numerics"]["chosen_by"] == "measured"


def test_time_to_accuracy_milestones():
    tta = load_script("time_to_accuracy")
    metrics = [
        {"epoch": 1, "val_acc": 0.70, "epoch_seconds": 10.0, "time": 120.0},
        {"epoch": 2, "val_acc": 0.82, "epoch_seconds": 8.0, "time": 128.0},
        {"epoch": 3, "val_acc": 0.86, "epoch_seconds": 8.0, "time": 136.0},
    ]
    got = tta.milestones_from(metrics, started=100.0, marks=[0.80, 0.85, 0.90])
    assert got == {
        "0.80": {"epoch": 2, "train_seconds": 18.0, "wall_seconds": 28.0},
        "0.85": {"epoch": 3, "train_seconds": 26.0, "wall_seconds": 36.0},
        "0.90": None,
    }


def test_step_overhead_prints_every_figure(tmp_path, monkeypatch, capsys):
    bench = load_script("step_overhead")
    out = tmp_path / "overhead.json"
    threads = torch.get_num_threads()
    argv = ["step_overhead.py", "--steps", "2", "--repeats", "1", "--json-out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    try:
        assert bench.main() == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert set(result["aten_ops_per_step"]) == {"bare", "bare_foreach", "data", "trainctl"}
    # foreach SGD dispatches fewer ops than the per-parameter loop; the trainer's step uses it
    assert result["aten_ops_per_step"]["bare_foreach"] < result["aten_ops_per_step"]["bare"]
    assert result["trainctl_us"] > 0 and result["trainctl_over_bare"] > 0
    assert "trainctl/bare" in capsys.readouterr().out
