"""cpuboost.runtime: pools, pinning, tasks and multi-stream modules on the stock GNU OpenMP.
Multi-stream outputs are compared with the unsplit model: exactly where the rows go through the
same kernels (bitwise), and with a stated tolerance where batch size changes the GEMM blocking."""
import os
import threading
from collections import namedtuple

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.errors import ConfigError
from cpuboost.hw.topology import read_topology
from cpuboost.runtime import (CPUPool, MultiStreamModule, MultiStreamModuleHint, Task,
                              embedding_bag_split, pin)
from cpuboost.runtime.multi_stream import AUTO_TRIALS, auto_streams

CORES = [core[0].id for core in read_topology().cores()]
needs_two = pytest.mark.skipif(len(CORES) < 2, reason="needs 2 usable cores")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


# -- CPUPool / pin -------------------------------------------------------------------------------
def test_pool_defaults_and_validation():
    assert CPUPool().core_ids == CORES
    assert CPUPool(node_id=0).core_ids == [c[0].id for c in read_topology().cores(0)]
    assert CPUPool([CORES[0]]).core_ids == [CORES[0]]
    with pytest.raises(ConfigError, match="not usable"):
        CPUPool([10_000])
    with pytest.raises(ConfigError, match="twice"):
        CPUPool([CORES[0], CORES[0]])
    with pytest.raises(ConfigError, match="not both"):
        CPUPool([CORES[0]], node_id=0)
    with pytest.raises(ConfigError, match="NUMA node"):
        CPUPool(node_id=99)
    with pytest.raises(ConfigError, match="no cores"):
        CPUPool([])


def test_pool_split_gives_extra_cores_to_the_first():
    pool = CPUPool(CORES)
    parts = pool.split(len(CORES))
    assert [p.core_ids for p in parts] == [[c] for c in CORES]
    with pytest.raises(ConfigError, match="cannot split"):
        pool.split(len(CORES) + 1)


def test_pin_binds_the_thread_and_restores_it():
    before_mask, before_threads = os.sched_getaffinity(0), torch.get_num_threads()
    pool = CPUPool([CORES[-1]])
    with pin(pool):
        assert os.sched_getaffinity(0) == {CORES[-1]}
        assert torch.get_num_threads() == 1
        y = mlp()(torch.randn(4, 16))
    assert os.sched_getaffinity(0) == before_mask
    assert torch.get_num_threads() == before_threads
    assert y.shape == (4, 8)

    @pin(pool)
    def inside():
        return os.sched_getaffinity(0), torch.get_num_threads()
    assert inside() == ({CORES[-1]}, 1)
    assert os.sched_getaffinity(0) == before_mask


def test_binding_one_thread_leaves_new_threads_default():
    before = torch.get_num_threads()
    task = Task(lambda: torch.get_num_threads(), CPUPool([CORES[0]]))
    assert task().get() == 1
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [before] and torch.get_num_threads() == before
    task.close()


def test_openmp_rebinding_is_warned(monkeypatch):
    monkeypatch.setenv("OMP_PROC_BIND", "close")
    with pytest.warns(RuntimeWarning, match="OMP_PROC_BIND"):
        Task(lambda: None, CPUPool([CORES[0]])).close()


# -- Task ----------------------------------------------------------------------------------------
def test_task_runs_on_its_pool_and_returns_a_future():
    model = mlp()
    x = torch.randn(5, 16)
    task = Task(model, CPUPool([CORES[-1]]))
    fut = task(x)
    with torch.no_grad():
        # 1 thread in the task, all cores here: GEMM blocking may differ in the last ulp
        torch.testing.assert_close(fut.get(), model(x), rtol=1e-5, atol=1e-6)
    where = Task(lambda: (os.sched_getaffinity(0), torch.get_num_threads()), CPUPool([CORES[-1]]))
    assert where.run_sync() == ({CORES[-1]}, 1)
    task.close()
    with pytest.raises(RuntimeError, match="closed"):
        task(x)


def test_task_carries_grad_inference_and_autocast_modes():
    probe = Task(lambda x: (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                            (x @ x).dtype), CPUPool([CORES[0]]))
    x = torch.randn(4, 4)
    assert probe(x).get() == (True, False, torch.float32)
    with torch.no_grad():
        assert probe(x).get()[0] is False
    with torch.inference_mode():
        assert probe(x).get()[1] is True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert probe(x).get()[2] == torch.bfloat16


def test_task_exception_reaches_get():
    def boom(x):
        raise ValueError(f"bad {x}")
    with pytest.raises(ValueError, match="bad 3"):
        Task(boom, CPUPool([CORES[0]]))(3).get()
    with pytest.raises(ConfigError, match="CPUPool"):
        Task(mlp(), [0])


# -- MultiStreamModule ---------------------------------------------------------------------------
@needs_two
@pytest.mark.parametrize("batch", [2, 7, 1])
def test_uneven_and_tiny_batches_match_the_model(batch):
    model = mlp()
    x = torch.randn(batch, 16)
    ms = MultiStreamModule(model, num_streams=2)
    with torch.no_grad():
        with pin(CPUPool([CORES[0]])):  # the streams' calls, one thread each
            ref = torch.cat([model(x[:(batch + 1) // 2]), model(x[(batch + 1) // 2:])])
        out = ms(x)
        assert torch.equal(out, ref)  # the same rows through the same calls: bitwise
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    assert ms(x).shape == (batch, 8)
    ms.close()


class Nested(nn.Module):
    def forward(self, pair, cfg, *, mask=None, scale=1.0):
        a, b = pair
        out = {"sum": (a + b["v"]) * cfg["w"] * scale, "scale": torch.tensor(scale)}
        if mask is not None:
            out["masked"] = out["sum"] * mask
        return Out(out["sum"], out["scale"], out.get("masked"))


Out = namedtuple("Out", "sum scale masked")


@needs_two
def test_nested_inputs_kwargs_and_broadcast_values_follow_the_hints():
    a, v, mask = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    w = torch.randn(3)  # shared by every stream
    hint = MultiStreamModuleHint((0, {"v": 0}), {"w": None}, mask=0, scale=None)
    ms = MultiStreamModule(Nested(), num_streams=2, input_split_hint=hint,
                           output_concat_hint=MultiStreamModuleHint((0, None, 0)))
    out = ms((a, {"v": v}), {"w": w}, mask=mask, scale=2.0)
    ref = Nested()((a, {"v": v}), {"w": w}, mask=mask, scale=2.0)
    assert isinstance(out, Out)
    assert torch.equal(out.sum, ref.sum) and torch.equal(out.masked, ref.masked)
    assert len(out.scale) == 2  # None: one value per stream
    with pytest.raises(ConfigError, match="keyword argument"):
        MultiStreamModule(Nested(), num_streams=2,
                          input_split_hint=MultiStreamModuleHint((0, {"v": 0}), {"w": None}))(
            (a, {"v": v}), {"w": w}, mask=mask)
    with pytest.raises(ConfigError, match="0-d tensor"):
        MultiStreamModule(Nested(), num_streams=2, input_split_hint=hint)(
            (a, {"v": v}), {"w": w}, mask=mask, scale=2.0)


@needs_two
def test_disagreeing_batch_sizes_are_refused_with_the_way_out():
    model = lambda x, y: x.sum(1) + y.sum(1)  # noqa: E731
    ms = MultiStreamModule(model, num_streams=2)
    with pytest.raises(ConfigError, match="disagree on the batch size.*embedding_bag_split"):
        ms(torch.randn(4, 3), torch.randn(6, 3))


@needs_two
def test_custom_split_and_concat_functions_and_list_output():
    def split(args, kwargs, streams):
        (x,) = args
        return [((x[::2],), {}), ((x[1::2],), {})]

    def join(outs):
        out = torch.empty(sum(len(o) for o in outs), *outs[0].shape[1:])
        out[::2], out[1::2] = outs
        return out
    model = mlp()
    x = torch.randn(6, 16)
    with torch.no_grad():
        ms = MultiStreamModule(model, 2, input_split_hint=split, output_concat_hint=join)
        torch.testing.assert_close(ms(x), model(x), rtol=1e-5, atol=1e-6)
        raw = MultiStreamModule(model, 2, concat_output=False)(x)
        assert isinstance(raw, list) and len(raw) == 2


def test_stream_count_checks():
    with pytest.raises(ConfigError, match="more than the"):
        MultiStreamModule(mlp(), num_streams=len(CORES) + 1)
    with pytest.raises(ConfigError, match="positive int"):
        MultiStreamModule(mlp(), num_streams=0)
    assert auto_streams(2) == 2 and auto_streams(4) == 4 and auto_streams(56) == 14


@needs_two
def test_auto_measures_and_keeps_one_choice_per_signature():
    model = mlp()
    ms = MultiStreamModule(model, num_streams="AUTO")
    x = torch.randn(8, 16)
    with torch.no_grad():
        for _ in range(2 * (AUTO_TRIALS + 1)):
            torch.testing.assert_close(ms(x), model(x), rtol=1e-5, atol=1e-6)
    (sig, choice), = ms.stream_choice.items()
    assert choice in (1, 2) and ((8, 16), torch.float32) in sig
    assert ms(torch.randn(3, 16)).shape == (3, 8)  # a new signature starts its own trials
    assert len(ms.stream_choice) == 1


def test_ipex_spelling():
    assert cpuboost.cpu.runtime.MultiStreamModule is MultiStreamModule
    assert cpuboost.runtime.CPUPool is CPUPool
    # also as an import path (it raised ModuleNotFoundError: cpu.runtime was only an attribute)
    from cpuboost.cpu.runtime import CPUPool as imported
    import cpuboost.cpu.runtime as module
    assert imported is CPUPool and module is cpuboost.runtime


# -- EmbeddingBag inputs -------------------------------------------------------------------------
class Bags(nn.Module):
    def __init__(self, mode="sum", include_last_offset=False):
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(50, 4, mode=mode, include_last_offset=include_last_offset)
        self.dense = nn.Linear(3, 4)

    def forward(self, dense, indices, offsets, per_sample_weights=None):
        return self.dense(dense) + self.bag(indices, offsets, per_sample_weights)


def bags_input(sizes, weights=False, last=False):
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 50, (sum(sizes),), generator=g)
    offsets = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)[:-1].tolist()))
    if last:
        offsets = torch.cat([offsets, torch.tensor([sum(sizes)])])
    psw = torch.rand(sum(sizes), generator=g) if weights else None
    return torch.randn(len(sizes), 3, generator=g), indices, offsets, psw


@needs_two
@pytest.mark.parametrize("mode,weights,last", [("sum", False, False), ("mean", False, False),
                                               ("sum", True, False), ("sum", False, True)])
def test_embedding_bag_split_any_bag_sizes(mode, weights, last):
    model = Bags(mode, last)
    dense, idx, off, psw = bags_input([3, 1, 5, 2, 4], weights, last)
    split = embedding_bag_split(indices="indices", offsets="offsets",
                                per_sample_weights="per_sample_weights" if weights else None,
                                include_last_offset=last)
    ms = MultiStreamModule(model, 2, input_split_hint=split)
    with torch.no_grad():
        out = ms(dense=dense, indices=idx, offsets=off, per_sample_weights=psw)
        ref = model(dense, idx, off, psw)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@needs_two
def test_dlrm_multi_stream_equals_single_stream():
    from cpuboost.bench.zoo import DLRM, _dlrm_inputs
    torch.manual_seed(0)
    model = DLRM(tables=3, rows=1000, dim=16).eval()
    inp = _dlrm_inputs(64, bag=4, tables=3, rows=1000)
    ms = MultiStreamModule(model, 2, input_split_hint=embedding_bag_split("indices", "offsets"))
    with torch.no_grad():
        assert torch.equal(ms(**inp), model(**inp))  # measured bitwise equal on this machine
        # positional spelling, uneven batch
        inp = _dlrm_inputs(7, bag=4, tables=3, rows=1000)
        ms = MultiStreamModule(model, 2, input_split_hint=embedding_bag_split(1, 2))
        torch.testing.assert_close(ms(inp["dense"], inp["indices"], inp["offsets"]),
                                   model(**inp), rtol=1e-5, atol=1e-6)


@needs_two
def test_embedding_bag_split_2d_with_unequal_tables_is_refused():
    idx = torch.arange(8).reshape(2, 4)
    off = torch.tensor([[0, 1, 2, 3], [0, 3, 3, 4]])  # table 1's bags differ from table 0's
    split = embedding_bag_split(0, 1)
    with pytest.raises(ConfigError, match="same number of indices"):
        split((idx, off), {}, 2)
    with pytest.raises(ConfigError, match="no argument"):
        split((idx,), {}, 2)
    with pytest.raises(ConfigError, match="must be tensors, got Tensor and list"):
        split((idx, [[0, 1], [0, 2]]), {}, 2)


EXIT_SCRIPT = """
import sys, torch
from cpuboost.runtime import MultiStreamModule, embedding_bag_split
from cpuboost.bench.zoo import DLRM, _dlrm_inputs
def run():
    torch.manual_seed(0)
    model = DLRM(tables=8, rows=10000, dim=64).eval()
    inp = _dlrm_inputs(256, tables=8, rows=10000)
    split = embedding_bag_split("indices", "offsets")
    ms = MultiStreamModule(model, 2, input_split_hint=split)
    auto = MultiStreamModule(model, "AUTO", input_split_hint=split)  # collected on return
    with torch.no_grad():
        for _ in range(20):
            ms(**inp), auto(**inp), model(**inp)
    return ms
kept = run()           # alive until the interpreter exits
if sys.argv[1] == "drop":
    del kept           # collected: its workers end while the program goes on
"""


@needs_two
@pytest.mark.parametrize("how", ["keep", "drop"])
def test_process_exits_cleanly_with_streams_alive_or_collected(tmp_path, how):
    import subprocess
    import sys
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    for _ in range(3):  # before the fix, about 1 run in 5 of this script aborted at exit
        r = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr


def test_output_hints_name_what_is_missing():
    from cpuboost.runtime.split import concat_outputs
    outs = [{"a": torch.ones(2, 1), "b": torch.zeros(2, 1)}] * 2
    with pytest.raises(ConfigError, match=r"no entry for output keys \['b'\]"):
        concat_outputs(outs, MultiStreamModuleHint(a=0))
    joined = concat_outputs(outs, MultiStreamModuleHint(a=0, b=None))
    assert joined["a"].shape == (4, 1) and isinstance(joined["b"], list)
    # plain values: kept once when equal, a list when they differ or cannot be compared
    assert concat_outputs([None, None], 0) is None
    assert concat_outputs([3, 4], 0) == [3, 4]
