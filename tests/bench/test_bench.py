"""The bench harness and CLI on a tiny user model (timings are not asserted, only produced)."""
import json
import subprocess
import sys

import torch
from torch import nn

from cpuboost.bench.harness import run_case
from cpuboost.bench.zoo import DLRM, user_case


def tiny_factory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    return model.eval(), torch.randn(8, 16)


def test_run_case_reports_every_variant():
    case = user_case("tests.bench.test_bench:tiny_factory")
    variants = ("eager_fp32", "cpuboost_fp32", "eager_bf16", "cpuboost_bf16")
    result = run_case(case, variants, rounds=2, round_s=0.02)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == set(variants)
    assert rows["eager_fp32"]["speedup"] == 1.0
    assert all(r["median_ms"] > 0 and r["speedup"] > 0 for r in rows.values())
    assert rows["cpuboost_fp32"]["max_rel_diff"] <= 1e-4
    assert rows["cpuboost_bf16"]["max_rel_diff"] <= 5e-2


def test_cli_writes_json_and_plot(tmp_path):
    plot = tmp_path / "speed.png"
    out = subprocess.run(
        [sys.executable, "-m", "cpuboost.cli.main", "bench", "--model",
         "tests.bench.test_bench:tiny_factory", "--rounds", "1", "--no-compile",
         "--variants", "eager_fp32,cpuboost_fp32", "--out", str(tmp_path), "--plot", str(plot)],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cpuboost_fp32" in out.stdout
    files = list(tmp_path.glob("bench-*.json"))
    assert len(files) == 1 and plot.stat().st_size > 0
    data = json.loads(files[0].read_text())
    assert data["results"][0]["rows"][1]["variant"] == "cpuboost_fp32"


def test_dlrm_shapes():
    model = DLRM(tables=2, rows=100, dim=8).eval()
    idx = torch.randint(0, 100, (2, 12))
    off = torch.arange(0, 12, 3).repeat(2, 1)
    assert model(torch.randn(4, 13), idx, off).shape == (4, 1)
