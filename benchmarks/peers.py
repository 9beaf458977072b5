"""cpuboost against the other runtimes a user could pick (ONNX Runtime, OpenVINO), fp32, on the
bench zoo's cases: every variant timed round-robin in one process, ratios vs stock eager fp32.

The peers are not cpuboost dependencies. Install them beside the venv, never into it, and
without their dependencies the venv already has (a second numpy or sympy on the path would
shadow the venv's, which torch.compile uses), then run with them on the path:

    .venv/bin/pip install --no-deps --target /tmp/peerpkgs onnxruntime openvino \
        openvino-telemetry onnx onnxscript onnx_ir ml_dtypes flatbuffers protobuf
    PYTHONPATH=/tmp/peerpkgs .venv/bin/python benchmarks/peers.py \
        --cases resnet50_bs1,bert_base_bs1_s128 --out benchmarks/results

A peer that fails to install or convert is recorded as skipped with its error, not hidden.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from cpuboost.bench.harness import run_case
from cpuboost.bench.zoo import CASES
from cpuboost.verify import _leaves

OURS = ("eager_fp32", "cpuboost_fp32", "cpuboost_compile_fp32", "compile_fp32")


class _Positional(nn.Module):
    """The model called with the sample's keyword tensors as positional arguments, returning
    the flat tuple of output tensors (what ONNX and OpenVINO take and give)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names
        self.eval()

    def forward(self, *args):
        return tuple(_leaves(self.model(**dict(zip(self.names, args)))))


def _dynamic_dims(sample: dict, varying: bool) -> dict | None:
    """Sequence length (dim 1 of 2-d token inputs) is dynamic for the varying-length case."""
    if not varying:
        return None
    seq = torch.export.Dim("seq", min=2, max=512)
    return {"args": tuple({1: seq} if t.dim() == 2 else None for t in sample.values())}


def onnxruntime_fp32(model, sample, varying: bool):
    """``run(inputs)`` for the model exported to ONNX (sequence length dynamic if varying)."""
    import onnxruntime as ort
    names = list(sample)
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    torch.onnx.export(_Positional(model, names), tuple(sample.values()), str(path),
                      dynamo=True, dynamic_shapes=_dynamic_dims(sample, varying),
                      input_names=names, optimize=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    # ORT's threads spin between runs by default, stealing the cores from the variants
    # timed after it in the same round: eager fp32 measured 1.5x slower with spinning on
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(inputs):
        feeds = {k: v.numpy() for k, v in inputs.items()}
        return tuple(torch.from_numpy(o) for o in session.run(None, feeds))
    return run


def openvino_fp32(model, sample, varying: bool):
    """``run(inputs)`` for the model converted by OpenVINO (shapes stay dynamic)."""
    import openvino as ov
    names = list(sample)
    converted = ov.convert_model(_Positional(model, names),
                                 example_input=tuple(sample.values()))
    compiled = ov.Core().compile_model(converted, "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()

    def run(inputs):
        out = request.infer([v.numpy() for v in inputs.values()])
        return tuple(torch.from_numpy(out[o].copy()) for o in compiled.outputs)
    return run


def _available(module: str) -> str | None:
    try:
        __import__(module)
        return None
    except ImportError as exc:
        return f"{module} not importable ({exc}); see this file's docstring"


class PeerFailed(RuntimeError):
    def __init__(self, variant: str, why: str):
        super().__init__(f"{variant}: {why}")
        self.variant, self.why = variant, why


def _guarded(variant: str, convert):
    """run_case's ``make(model, sample, varying)``: a conversion error names its peer."""
    def make(model, sample, varying):
        try:
            return convert(model, sample, varying)
        except Exception as exc:  # any failure of the other library: record it, go on
            raise PeerFailed(variant, f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    return make


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="resnet50_bs1,bert_base_bs1_s128")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--ours", default=",".join(OURS), help="cpuboost/torch variants to time too")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    peers_of = {"onnxruntime_fp32": ("onnxruntime", onnxruntime_fp32),
                "openvino_fp32": ("openvino", openvino_fp32)}
    results, skipped = [], {}
    for name in args.cases.split(","):
        peers = {}
        for variant, (module, convert) in peers_of.items():
            why = _available(module)
            if why:
                skipped[variant] = why
            else:
                peers[variant] = _guarded(variant, convert)
        while True:  # a peer that cannot convert this model is dropped and the case rerun
            try:
                result = run_case(CASES[name], tuple(args.ours.split(",")) + tuple(peers),
                                  rounds=args.rounds, peers=peers)
                break
            except PeerFailed as failed:
                skipped[f"{name}/{failed.variant}"] = failed.why
                print(f"skipped {name}/{failed}", file=sys.stderr)
                del peers[failed.variant]
        results.append(result)
        for row in result["rows"]:
            print(f"{name:28s} {row['variant']:24s} {row['median_ms']:9.1f} ms "
                  f"{row['speedup']:5.2f}x  cos {row['cosine']:.6f}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) / f"peers-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "skipped": skipped, "results": results}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
