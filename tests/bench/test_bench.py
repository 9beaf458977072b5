"""The bench harness and CLI on a tiny user model (timings are not asserted, only produced)."""
import json
import subprocess
import sys

import pytest
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


def test_int8_variants_report_speed_and_the_accuracy_proxy():
    case = user_case("tests.bench.test_bench:tiny_factory")  # calibrates on the sample
    variants = ("eager_fp32", "cpuboost_int8", "cpuboost_int8_dynamic")
    rows = {r["variant"]: r for r in run_case(case, variants, rounds=2, round_s=0.02)["rows"]}
    assert set(rows) == set(variants)
    assert rows["eager_fp32"]["cosine"] == 1.0
    assert rows["cpuboost_int8"]["cosine"] > 0.999
    assert rows["cpuboost_int8_dynamic"]["cosine"] > 0.999


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


def test_cycling_inputs_one_request_per_call():
    from cpuboost.bench.zoo import BenchCase, Cycle

    seen = []

    class LengthAgnostic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            seen.append(x.shape[1])
            return self.fc(x).mean(1)

    def build():
        torch.manual_seed(0)
        return LengthAgnostic().eval(), Cycle([(torch.randn(1, n, 8),) for n in (3, 5, 7)])

    result = run_case(BenchCase("cycle", build), ("eager_fp32", "cpuboost_fp32"), rounds=1,
                      round_s=0.01)
    assert {3, 5, 7} <= set(seen)
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["cpuboost_fp32"]["max_rel_diff"] <= 1e-4  # both compared on the same request
    assert rows["eager_fp32"]["graphs_compiled"] == 0


@pytest.mark.parametrize("varying", [False, True])
def test_peer_variants_run_beside_ours_on_the_same_requests(varying):
    """benchmarks/peers.py's hook: another library's runner is built once from (model, sample,
    varying) and timed and checked like a variant of ours, on every request of a Cycle."""
    from cpuboost.bench.zoo import BenchCase, Cycle
    made, served = [], []

    def build():
        torch.manual_seed(0)
        requests = [{"input": torch.randn(2, 8)}, {"input": torch.randn(5, 8)}]
        return nn.Linear(8, 4).eval(), Cycle(requests) if varying else requests[0]

    def peer(model, sample, is_varying):
        made.append((tuple(sample["input"].shape), is_varying))
        weight = model.weight.detach().clone()  # its own copy, as a converted model would be

        def run(inputs):
            served.append(inputs["input"].shape[0])
            return inputs["input"] @ weight.t() + model.bias.detach()
        return run

    result = run_case(BenchCase("peer", build), ("eager_fp32", "other_fp32"), rounds=1,
                      round_s=0.01, peers={"other_fp32": peer})
    assert made == [((2, 8), varying)]
    assert set(served) == ({2, 5} if varying else {2})
    row = next(r for r in result["rows"] if r["variant"] == "other_fp32")
    assert row["max_rel_diff"] <= 1e-5 and row["speedup"] > 0


def test_graph_mode_rows_count_their_own_graphs(monkeypatch):
    """Lengths 3/5/7: a static graph, then one with the length dynamic. A graph-mode row takes
    the count from its compiled forward, not from Dynamo's process-wide counter (which missed
    recompilations in the full bench: 1 graph reported for the dynamic-length BERT)."""
    from cpuboost.bench import harness
    from cpuboost.bench.zoo import BenchCase, Cycle
    monkeypatch.setattr(harness, "_compiled_graphs", lambda: 0)  # a counter that sees nothing
    torch._dynamo.reset()  # Dynamo learns dynamic dims per code object: forget other tests'

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.GELU()).eval()
        return model, Cycle([(torch.randn(1, n, 8),) for n in (3, 5, 7)])

    result = run_case(BenchCase("lengths", build), ("eager_fp32", "cpuboost_compile_fp32"),
                      rounds=1, round_s=0.01)
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["eager_fp32"]["graphs_compiled"] == 0
    assert rows["cpuboost_compile_fp32"]["graphs_compiled"] == 2
    assert rows["cpuboost_compile_fp32"]["max_rel_diff"] <= 1e-4


def test_compiled_variants_get_their_own_process(monkeypatch, tmp_path):
    from cpuboost.cli import bench as cli_bench
    from cpuboost.cli.main import main
    spawned = []

    def fake_spawn(case, variants, rounds, memory=False, llm=None):
        spawned.append(list(variants))
        rows = [{"case": case, "variant": v, "median_ms": 1.0, "speedup": 1.0, "setup_s": 0.0,
                 "peak_rss_mb": 1.0, "setup_added_mb": 0.0, "max_rel_diff": 0.0} for v in variants]
        return {"case": case, "rows": rows}

    monkeypatch.setattr(cli_bench, "_spawn", fake_spawn)
    assert main(["bench", "--cases", "dlrm_bs256", "--rounds", "1", "--out", str(tmp_path),
                 "--variants", "cpuboost_fp32,compile_fp32,cpuboost_compile_bf16"]) == 0
    assert spawned == [["eager_fp32", "cpuboost_fp32"],
                       ["eager_fp32", "compile_fp32", "cpuboost_compile_bf16"]]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_variants_are_skipped_where_bf16_is_emulated(monkeypatch, tmp_path, native):
    import dataclasses
    from cpuboost.cli import bench as cli_bench
    from cpuboost.cli.main import main
    from cpuboost.hw import features
    flags = {"avx2", "avx512_bf16"} if native else {"avx2"}
    fake = dataclasses.replace(features.detect(), flags=frozenset(flags))
    monkeypatch.setattr("cpuboost.hw.detect", lambda: fake)
    spawned = []

    def fake_spawn(case, variants, rounds, memory=False, llm=None):
        spawned.extend(variants)
        return {"case": case, "rows": [], "error": None}

    monkeypatch.setattr(cli_bench, "_spawn", fake_spawn)
    assert main(["bench", "--cases", "dlrm_bs256", "--rounds", "1", "--out", str(tmp_path)]) == 0
    saved = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    bf16 = {v for v in spawned if "bf16" in v}
    assert bool(bf16) == native and bool(saved["skipped"]) != native
    assert all("bf16" in v for v in saved["skipped"])
    spawned.clear()  # asked for by name: run anyway
    main(["bench", "--cases", "dlrm_bs256", "--rounds", "1", "--out", str(tmp_path),
          "--variants", "cpuboost_bf16"])
    assert "cpuboost_bf16" in spawned


def test_generate_requests_time_generate():
    """A Generate request times model.generate(); optimize checks numerics on its forward."""
    import pytest
    transformers = pytest.importorskip("transformers")
    from cpuboost.bench.zoo import BenchCase, Generate

    def build():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        ids = torch.randint(5, 300, (1, 5), generator=torch.Generator().manual_seed(0))
        return model, Generate({"input_ids": ids}, dict(input_ids=ids, max_new_tokens=6,
                                                        min_new_tokens=6, do_sample=False,
                                                        pad_token_id=0))

    result = run_case(BenchCase("tiny_generate", build, int8=False, llm=True),
                      ("eager_fp32", "cpuboost_fp32", "cpuboost_llm_bf16", "cpuboost_int8"),
                      rounds=1, round_s=0.01)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"eager_fp32", "cpuboost_fp32", "cpuboost_llm_bf16"}  # int8=False case
    assert rows["cpuboost_fp32"]["max_rel_diff"] == 0  # the same 11 tokens


def test_llm_bench_measures_every_variant():
    from cpuboost.bench.llm import EAGER, run_llm
    result = run_llm("tiny", EAGER, rounds=1, prompt=8, tokens=4)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == set(EAGER) and result["copy_bandwidth_gb_s"] > 0
    assert rows["stock_bf16"]["speedup_bs1"] == 1.0
    for r in rows.values():
        assert r["prefill_ms"] > 0 and r["decode_tok_s_bs1"] > 0 and r["decode_tok_s_bs8"] > 0
    # weight-only int4 reads fewer bytes per token than int8, which reads fewer than bf16
    assert (rows["cpuboost_woq_int4"]["decode_bytes"] < rows["cpuboost_woq_int8"]["decode_bytes"]
            < rows["cpuboost_bf16"]["decode_bytes"])


def test_llm_cli_spawns_eager_compile_and_memory_workers(monkeypatch, tmp_path):
    from cpuboost.cli import bench as cli_bench
    from cpuboost.cli.main import main
    spawned = []

    def fake_spawn(case, variants, rounds, memory=False, llm=None):
        spawned.append((list(variants), memory, llm))
        if memory:
            return {"case": case, "model_mb": 2.0, "peak_added_mb": 2.2, "after_added_mb": 1.0,
                    "peak_ratio": 1.1}
        rows = [{"variant": v, "prefill_ms": 1.0, "prefill_speedup": 1.0, "setup_s": 0.0,
                 "decode_tok_s_bs1": 1.0, "decode_tok_s_bs8": 1.0, "speedup_bs1": 1.0,
                 "speedup_bs8": 1.0, "decode_bytes": 1e9, "bandwidth_gb_s": 1.0}
                for v in variants]
        return {"case": case, "params": 1e9, "copy_bandwidth_gb_s": 20.0, "threads": 2,
                "rows": rows}

    monkeypatch.setattr(cli_bench, "_spawn", fake_spawn)
    assert main(["bench", "--llm", "--out", str(tmp_path)]) == 0
    assert spawned[0][0][0] == "stock_bf16" and "cpuboost_woq_int4" in spawned[0][0]
    assert spawned[1][0] == ["stock_bf16", "stock_compile_bf16"]
    assert spawned[2][1] and all(s[2] == "1b" for s in spawned)
    assert len(list(tmp_path.glob("bench-llm-*.json"))) == 1


def test_runtime_streams_bench_rows(capsys):
    from cpuboost.bench import runtime
    res = runtime.run_streams("dlrm_bs256", "eager_fp32", rounds=1, round_s=0.05)
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"one_stream", f"{res['cores']}_streams", "auto"}
    assert rows["one_stream"]["ratio"] == 1.0
    assert all(r["samples_per_s"] > 0 for r in rows.values())
    assert rows[f"{res['cores']}_streams"]["max_abs_diff"] == 0.0  # DLRM: bitwise equal here
    assert res["auto_choice"] and set(res["auto_choice"]) <= {1, res["cores"]}
    runtime.print_runtime([res], [])
    assert "AUTO chose" in capsys.readouterr().out


@pytest.mark.parametrize("native", [True, False])
def test_runtime_bench_times_cpuboost_in_bf16_only_where_it_is_native(monkeypatch, native):
    import types

    import cpuboost.hw
    from cpuboost.bench import runtime
    monkeypatch.setattr(cpuboost.hw, "detect", lambda: types.SimpleNamespace(native_bf16=native))
    assert runtime.forms() == ("eager_fp32", "cpuboost_bf16" if native else "cpuboost_fp32")
    with pytest.raises(ValueError, match="unknown form"):
        runtime.build("dlrm_bs256", "cpuboost_int4")


@pytest.mark.slow
def test_runtime_bench_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cpuboost.cli.main", "bench", "--runtime",
                        "--quick", "--rounds", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = tmp_path.glob("bench-runtime-*-quick.json")
    data = json.loads(path.read_text())
    assert data["streams"] and data["instances"][0]["rows"][0]["samples_per_s"] > 0


@pytest.mark.parametrize("native, weights_only, skipped", [
    (True, False, []), (False, True, ["eager_bf16"]),
    (False, False, ["eager_bf16", "cpuboost_bf16", "cpuboost_compile_bf16"])])
def test_bench_skips_only_emulated_bf16(monkeypatch, native, weights_only, skipped):
    """Without bf16 instructions stock autocast bf16 is emulated (skipped unless named);
    cpuboost's bf16 is timed where it means bf16 weights with float32 arithmetic."""
    import types

    import cpuboost.checks
    import cpuboost.hw
    from cpuboost.cli.bench import _emulated_bf16_variants
    monkeypatch.setattr(cpuboost.hw, "detect", lambda: types.SimpleNamespace(native_bf16=native))
    monkeypatch.setattr(cpuboost.checks, "bf16_weights_only", lambda dtype, hw: weights_only)
    variants = ["eager_fp32", "eager_bf16", "cpuboost_bf16", "cpuboost_compile_bf16"]
    assert _emulated_bf16_variants(variants) == skipped
