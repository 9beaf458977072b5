"""cpuboost.export / cpuboost.load: AOTInductor packages that run in a fresh process, and every
damaged or mismatched package raising PackageError before compiled code is loaded."""
import json
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.config import BF16_WEIGHTS_NAME
from cpuboost.errors import ExportError, InvalidModelError, PackageError
from cpuboost.testing import AS_AVX512, TOY_MODELS, build_eval
from tests.conftest import BF16_RTOL, TiedLM, rel_err


@pytest.fixture(scope="module")
def conv_pkg(tmp_path_factory):
    """The conv+BN toy exported from a batch-1 example with a dynamic batch."""
    case = TOY_MODELS["conv_bn"]
    model = build_eval(case)
    path = cpuboost.export(model, case.inputs(1), tmp_path_factory.mktemp("pkg") / "conv.cbpk")
    return model, case, path


def _rewrite(src, dst, meta_change=None, blob_change=None):
    with zipfile.ZipFile(src) as zf:
        meta, blob = json.loads(zf.read("cpuboost.json")), zf.read("model.pt2")
    if meta_change:
        meta_change(meta)
    if blob_change:
        blob = blob_change(blob)
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr("cpuboost.json", json.dumps(meta))
        zf.writestr("model.pt2", blob)
    return dst


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_any_batch_matches_eager(conv_pkg, batch):
    model, case, path = conv_pkg
    loaded = cpuboost.load(path)
    x = case.inputs(batch)
    with torch.no_grad():
        assert rel_err(model(*x), loaded(*x)) <= 1e-4


def test_metadata_records_what_it_was_built_with(conv_pkg):
    meta = cpuboost.load(conv_pkg[2]).metadata
    assert meta["torch"] == torch.__version__ and meta["cpuboost"] == cpuboost.__version__
    assert meta["dynamic_batch"] and meta["inputs"]["args"][0]["shape"][0] is None
    assert meta["cpu"]["vec_isa"] and meta["verified"]["max_rel_diff"] <= 1e-3
    assert meta["compile_seconds"] > 0
    # a dynamic batch: Inductor leaves the weights of its oneDNN convolutions plain; cpuboost
    # packs those whose oneDNN format is the same at every batch (of this model's 3 Conv2d)
    passes = meta["graph_passes"]
    assert passes["conv_weights_packed_for_dynamic_batch"] >= 1
    assert passes["conv_weights_packed_for_dynamic_batch"] + passes["conv_weights_left_plain"] <= 3


def test_wrong_inputs_raise_before_compiled_code(conv_pkg):
    _, case, path = conv_pkg
    loaded = cpuboost.load(path)
    x = case.inputs(2)[0]
    with pytest.raises(ValueError, match="shape"):
        loaded(x[:, :, :5])
    with pytest.raises(ValueError, match="float32"):
        loaded(x.double())
    with pytest.raises(TypeError, match="positional"):
        loaded(x, x)


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(torch="2.5.0"), "torch==2.5.0"),
    (lambda m: m.update(cpuboost="9.3.0"), "cpuboost 9.3.0"),
    (lambda m: m.update(format=99), "format 99"),
    (lambda m: m["cpu"]["features"].append("amx_int8_imaginary"), "amx_int8_imaginary"),
    (lambda m: m["cpu"].update(vec_isa="avx1024"), "avx1024"),
    (lambda m: m["cpu"].update(machine="riscv64"), "riscv64"),
    (lambda m: m.update(cpu="x86"), "truncated or corrupted"),
    (lambda m: m.pop("inputs"), "truncated or corrupted"),
], ids=["torch", "cpuboost", "format", "cpu-feature", "vec-isa", "machine", "bad-cpu", "no-inputs"])
def test_package_for_another_setup_raises(conv_pkg, tmp_path, change, match):
    bad = _rewrite(conv_pkg[2], tmp_path / "other.cbpk", meta_change=change)
    with pytest.raises(PackageError, match=match):
        cpuboost.load(bad)


def test_damaged_files_raise(conv_pkg, tmp_path):
    path = conv_pkg[2]
    data = path.read_bytes()
    truncated = tmp_path / "truncated.cbpk"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    middle = len(data) // 2
    flipped[middle:middle + 64] = bytes(b ^ 0xFF for b in flipped[middle:middle + 64])
    corrupted = tmp_path / "corrupted.cbpk"
    corrupted.write_bytes(bytes(flipped))
    altered = _rewrite(path, tmp_path / "altered.cbpk", blob_change=lambda b: b[:-10] + b"0" * 10)
    not_zip = tmp_path / "notes.txt"
    not_zip.write_text("hello")
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("a.txt", "x")
    for bad, match in [(truncated, "truncated or corrupted"), (corrupted, "corrupted|checksum"),
                       (altered, "checksum"), (not_zip, "truncated or corrupted"),
                       (other_zip, "not a cpuboost package"), (tmp_path / "none", "no package")]:
        with pytest.raises(PackageError, match=match):
            cpuboost.load(bad)


@pytest.mark.slow
def test_bf16_package(tmp_path, emulated_bf16):
    """bf16 as autocast arithmetic (a CPU with bf16 instructions; emulated elsewhere): outputs
    in bf16. Where bf16 means bf16 weights, see tests/kernels/test_bf16_weights.py."""
    case = TOY_MODELS["mlp_bn"]
    model = build_eval(case)
    x = case.inputs(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bf16 emulated on this CPU
        loaded = cpuboost.load(cpuboost.export(model, x, tmp_path / "mlp.cbpk",
                                               dtype=torch.bfloat16))
    assert loaded.metadata["arithmetic"] == "bfloat16"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(*x)
    out = loaded(*x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_err(ref.float(), out.float()) <= 5e-2  # bf16 tolerance (stated in docs/deploy.md)


class _DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(InvalidModelError, match="cpuboost.export"):
        cpuboost.export(lambda x: x, torch.randn(2), tmp_path / "f.cbpk")
    with pytest.raises(ExportError, match="torch.export could not capture"):
        cpuboost.export(_DataDependent().eval(), torch.randn(2, 3), tmp_path / "d.cbpk")
    assert not list(tmp_path.iterdir())  # nothing half-written


_FRESH = textwrap.dedent("""
    import sys, torch, cpuboost
    model = cpuboost.load(sys.argv[1])
    inputs = torch.load(sys.argv[2])
    out = model(**inputs)
    torch.save(out, sys.argv[3])
    leaked = [m for m in ("transformers", "tests", "cpuboost.testing.toy_models") if m in sys.modules]
    assert not leaked, leaked
""")


def test_hf_model_runs_in_a_fresh_process_without_its_code(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(5, 300, (2, 16))
    path = cpuboost.export(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                           tmp_path / "bert.cbpk")
    from cpuboost.kernels import gemm_ops  # a plain model's linears and attention on the
    own = ["cpuboost::attention_f32", "cpuboost::linear"]  # AVX2 kernels too: loaded first
    assert cpuboost.load(path).metadata["cpuboost_ops"] == (own if gemm_ops() else [])
    ids3 = torch.randint(5, 300, (3, 16))
    # keyword order differs from the export's: inputs are matched by name, not position
    inputs = {"attention_mask": torch.ones_like(ids3), "input_ids": ids3}
    torch.save(inputs, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _FRESH, str(path), str(tmp_path / "in.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        ref = model(**inputs)
    assert type(out) is dict and set(out) == {"last_hidden_state", "pooler_output"}
    assert rel_err(ref.last_hidden_state, out["last_hidden_state"]) <= 1e-3


@pytest.mark.parametrize("dtype", [None, pytest.param(torch.bfloat16, marks=pytest.mark.slow)],
                         ids=["fp32", "bf16"])
def test_optimized_model_exports_and_runs_in_a_fresh_process(tmp_path, dtype):
    """A model cpuboost.optimize packed (on AVX2 CPUs its linears run cpuboost's own kernel,
    in bf16 with bf16 weights) exports with that kernel inside: the metadata names the op, and
    load loads its library first, so the package runs in a fresh process (it failed to load
    there before the metadata did), also one simulating an AVX-512 CPU, and computes what the
    model computes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 32)
    opt = cpuboost.optimize(model, dtype=dtype, sample_input=x)
    if dtype is not None and cpuboost.report_of(opt).dtype != BF16_WEIGHTS_NAME:
        pytest.skip("bf16 here is bf16 arithmetic, not bf16 weights with fp32 arithmetic")
    backends = [m.backend for m in opt.modules() if hasattr(m, "backend")]
    path = cpuboost.export(opt, {"input": x}, tmp_path / "opt.cbpk")
    assert [m.backend for m in opt.modules() if hasattr(m, "backend")] == backends
    own = any(b == "avx2" for b in backends)
    assert cpuboost.load(path).metadata["cpuboost_ops"] == (["cpuboost::linear"] if own else [])
    x3 = torch.randn(3, 32)
    torch.save({"input": x3}, tmp_path / "in.pt")
    # also on a server with AVX-512 (simulated), whose own models use oneDNN: the package's
    # AVX2 kernel still runs there (it was refused as "cannot run here")
    for prefix in ("", AS_AVX512) if own else ("",):
        subprocess.run([sys.executable, "-c", prefix + _FRESH, str(path), str(tmp_path / "in.pt"),
                        str(tmp_path / "out.pt")], check=True, timeout=300)
        tol = 1e-4 if dtype is None else BF16_RTOL
        with torch.no_grad():
            assert rel_err(opt(x3), torch.load(tmp_path / "out.pt")) <= 1e-5
            assert rel_err(model(x3), opt(x3)) <= tol


def test_package_calling_a_kernel_that_cannot_run_here_is_refused(tmp_path, monkeypatch):
    """A package that calls cpuboost's AVX2 kernel, loaded where the kernel cannot run (e.g. a
    CPU without AVX2, or no compiler): a PackageError that says so and what to do, not a
    missing-schema crash."""
    import importlib
    opt = cpuboost.optimize(nn.Sequential(nn.Linear(32, 16)).eval(),
                            sample_input=torch.randn(2, 32))
    if opt[0].backend != "avx2":
        pytest.skip("cpuboost's AVX2 kernel does not run here: no package calls it")
    path = cpuboost.export(opt, (torch.randn(2, 32),), tmp_path / "opt.cbpk")
    kernels = importlib.import_module("cpuboost.kernels")
    monkeypatch.setattr(kernels, "avx2_library", lambda: False)
    monkeypatch.setattr(kernels, "_library_why", ["no AVX2+FMA (simulated)"])
    with pytest.raises(PackageError, match=r"cpuboost::linear, which cannot run here \(no "
                                           r"AVX2\+FMA \(simulated\)\): export the model on"):
        cpuboost.load(path)


def test_package_built_against_another_op_schema_is_refused(tmp_path):
    """The compiled code passes cpuboost's ops the arguments of the schema it was built
    against; a cpuboost whose op takes other arguments refuses the package (compiled code
    calling an op whose schema had changed crashed)."""
    opt = cpuboost.optimize(nn.Sequential(nn.Linear(32, 16)).eval(),
                            sample_input=torch.randn(2, 32))
    if opt[0].backend != "avx2":
        pytest.skip("cpuboost's AVX2 kernel does not run here: no package calls it")
    path = cpuboost.export(opt, (torch.randn(2, 32),), tmp_path / "opt.cbpk")
    schema = cpuboost.load(path).metadata["cpuboost_op_schemas"]["cpuboost::linear"]
    assert schema.startswith("cpuboost::linear(Tensor input, Tensor packed")

    def older(meta):
        meta["cpuboost_op_schemas"]["cpuboost::linear"] = schema.replace(", int act", "")
    with pytest.raises(PackageError, match=r"calls cpuboost::linear\(.*but this cpuboost's op "
                                           r"is .*int act.*re-export the model"):
        cpuboost.load(_rewrite(path, tmp_path / "older.cbpk", older))


def test_winograd_convolutions_export_and_run_in_a_fresh_process(tmp_path):
    """On AVX2 CPUs, 3x3 convolutions in a package run cpuboost's Winograd kernel at any batch
    (its weight does not depend on the batch); load loads the kernel's library first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()).eval()
    path = cpuboost.export(model, {"input": torch.randn(1, 3, 24, 24)}, tmp_path / "wino.cbpk")
    meta = cpuboost.load(path).metadata
    from cpuboost.kernels import gemm_ops
    if not gemm_ops():
        assert meta["graph_passes"]["convs_on_cpuboost_winograd"] == 0
        return
    assert meta["graph_passes"]["convs_on_cpuboost_winograd"] == 1  # not the 3-channel one
    assert meta["cpuboost_ops"] == ["cpuboost::conv3x3_winograd"]
    x = torch.randn(3, 3, 24, 24)
    torch.save({"input": x}, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _FRESH, str(path), str(tmp_path / "in.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    with torch.no_grad():
        assert rel_err(model(x), torch.load(tmp_path / "out.pt")) <= 2e-5


def test_weights_are_frozen_and_packed_for_onednn(tmp_path):
    """Freezing only applies with grad off; without it the package ran aten convolutions on
    dense weights (ResNet-50 static batch 0.88x eager instead of 1.64x). Inductor packs conv
    weights only for a static batch."""
    import io
    case = TOY_MODELS["conv_bn"]
    path = cpuboost.export(build_eval(case), case.inputs(2), tmp_path / "static.cbpk",
                           dynamic_batch=False)
    with zipfile.ZipFile(path) as zf:
        inner = zipfile.ZipFile(io.BytesIO(zf.read("model.pt2")))
    wrapper = next(n for n in inner.namelist() if n.endswith("wrapper.cpp"))
    code = inner.read(wrapper).decode()
    assert "mkldnn" in code and "aoti_torch_cpu_convolution(" not in code


def test_int8_model_exports(tmp_path):
    """A quantized model is all in eval mode (the modules quantize puts in included) and
    exports: the package runs the int8 model's numerics."""
    case = TOY_MODELS["residual"]
    model = build_eval(case)
    torch.manual_seed(1)
    q = cpuboost.quantize(model, [case.inputs(4) for _ in range(3)])
    assert not any(m.training for m in q.modules())
    loaded = cpuboost.load(cpuboost.export(q, case.inputs(2), tmp_path / "int8.cbpk"))
    from cpuboost.nn.int8 import _Int8
    assert all(m.packed for m in q.modules() if isinstance(m, _Int8))  # eager form kept
    x = case.inputs(3)
    with torch.no_grad():
        assert rel_err(loaded(*x), q(*x)) < 2e-2


def test_head_tied_to_its_embedding_exports_without_a_packed_copy(tmp_path):
    """A head sharing its weight with the embedding runs oneDNN on that weight in a package
    too (no packed second copy), at any batch, in a fresh process."""
    model, ids = TiedLM().eval(), torch.randint(0, 500, (2, 9))
    path = cpuboost.export(model, {"ids": ids}, tmp_path / "tied.cbpk")
    assert cpuboost.load(path).metadata["graph_passes"][
        "linears_on_weights_shared_with_an_embedding"] == 1
    ids3 = torch.randint(0, 500, (3, 9))
    torch.save({"ids": ids3}, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _FRESH, str(path), str(tmp_path / "in.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    with torch.no_grad():
        assert rel_err(model(ids3), torch.load(tmp_path / "out.pt")) <= 1e-4


def test_weights_are_stored_beside_the_code_not_inside_it(tmp_path):
    """The compiled .so has STB_GNU_UNIQUE symbols (libstdc++'s), so glibc never unloads it:
    with the weights inside it, every load() of a package kept them mapped for good (96 MB per
    load of a 96 MB model). They are a blob of their own, freed with the loaded model."""
    import io
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).eval()
    x = torch.randn(2, 1024)  # 8 MB of weights: the .so's code is ~0.6 MB
    path = cpuboost.export(model, (x,), tmp_path / "mlp.cbpk")
    with zipfile.ZipFile(path) as zf, zipfile.ZipFile(io.BytesIO(zf.read("model.pt2"))) as inner:
        sizes = {i.filename: i.file_size for i in inner.infolist()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    so = [n for n in sizes if n.endswith(".so")]
    assert so and all(sizes[n] < weights / 2 for n in so), sizes
    assert sum(sizes.values()) - sum(sizes[n] for n in so) >= weights * 0.9, sizes
    loaded = cpuboost.load(path)
    with torch.no_grad():
        assert rel_err(model(x), loaded(x)) <= 1e-4
