import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each test starts a Python that imports torch


def trainer_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, timeout=120)


def test_describe_prints_the_resolved_spec_and_parameter_count():
    out = trainer_cli("describe", "--preset", "paper", "--set", "optim.epochs=30")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["num_parameters"] == 4_570_934 and result["spec"]["optim"]["epochs"] == 30


def test_describe_reads_a_spec_file_and_names_bad_fields(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("optim:\n  lr: 0.2\nmodel:\n  widths: [8, 8]\n  blocks: [1, 1]\n  se_reduction: 4\n")
    out = trainer_cli("describe", "--spec", str(spec))
    assert out.returncode == 0 and json.loads(out.stdout)["spec"]["optim"]["lr"] == 0.2
    bad = trainer_cli("describe", "--preset", "debug", "--set", "optim.momentum=2", "--set", "optim.nope=1")
    assert bad.returncode == 2
    assert "optim.momentum" in bad.stderr and "optim.nope" in bad.stderr
