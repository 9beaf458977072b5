"""cpuboost.quantize: every toy model, calibration forms, robustness, and clear errors."""
import copy

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost import (CalibrationError, ConfigError, DynamicInt8Config, SampleInputError,
                      StaticInt8Config)
from cpuboost.errors import UnsupportedRequestError
from cpuboost.nn.embedding import Int8Embedding, Int8EmbeddingBag
from cpuboost.nn.int8 import Int8Conv, Int8Linear, _Int8
from cpuboost.testing import TOY_MODELS
from cpuboost.verify import cosine, sqnr_db
from tests.conftest import run, toy

MIN_TOY_SQNR = 20.0  # dB at the model output: random toy weights, 8-bit everywhere


def _calib(case, n=4, batch=4):
    torch.manual_seed(1)
    return [case.inputs(batch) for _ in range(n)]


def _int8_layers(model):
    kinds = (_Int8, Int8Embedding, Int8EmbeddingBag)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
def test_every_toy_model_quantizes_close_to_float(name):
    case, model = toy(name)
    before = copy.deepcopy(model.state_dict())
    calib = _calib(case)
    q = cpuboost.quantize(model, calib)
    x = case.inputs(4)
    ref, out = run(model, case, x), run(q, case, x)
    assert sqnr_db(ref, out) > MIN_TOY_SQNR
    assert _int8_layers(q)
    report = cpuboost.report_of(q)
    applied = report.applied("quantize")
    assert len(applied) == len(_int8_layers(q)) and all("SQNR" in a for a in applied)
    assert "SQNR" in report.accuracy
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("name", ["transformer_encoder", "mlp_bn", "mha"])
def test_dynamic_needs_no_calibration(name):
    case, model = toy(name)
    q = cpuboost.quantize(model, config=DynamicInt8Config())
    x = case.inputs(4)
    assert sqnr_db(run(model, case, x), run(q, case, x)) > MIN_TOY_SQNR
    assert all(isinstance(m, Int8Linear) and m.dynamic for m in _int8_layers(q).values())


def test_bn_folded_and_relu_fused_into_int8_conv():
    case, model = toy("conv_bn")
    q = cpuboost.quantize(model, _calib(case))
    report = cpuboost.report_of(q)
    assert report.applied("fold_bn") and report.applied("fuse_activations")
    assert q.stem[0].post_op.name == "relu" and isinstance(q.stem[0], Int8Conv)
    assert not isinstance(q.up, _Int8)
    assert ("up", "kept in float: torch has no oneDNN int8 ConvTranspose kernel") in \
        report.pass_named("quantize").skipped
    # stem's output is also the residual, so it stays float: no uint8 hand-off
    assert report.applied("int8_hand_off") == []


def test_int8_layers_hand_uint8_through_identities():
    case, model = toy("mlp_bn")  # Linear -> BN (folded) -> act (fused) -> Dropout -> Linear
    q = cpuboost.quantize(model, _calib(case))
    assert cpuboost.report_of(q).applied("int8_hand_off") == ["net.0 -> net.4", "net.4 -> net.7"]


class _CastsBetween(nn.Module):
    """T5's feed-forward (wi -> ReLU -> cast to wo.weight.dtype where the dtypes differ -> wo)
    beside a plain Linear -> ReLU -> Linear: the cast never runs on float, so the recorded
    dataflow shows both as hand-offs, but on a uint8 hand-off it turned codes into values."""

    def __init__(self):
        super().__init__()
        self.wi, self.wo = nn.Linear(16, 32), nn.Linear(32, 16)
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)
        self.act, self.act_ab = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        h = self.act(self.wi(x))
        if h.dtype != self.wo.weight.dtype and self.wo.weight.dtype != torch.int8:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h) + self.b(self.act_ab(self.a(x)))


def test_a_hand_off_the_models_code_would_change_stays_float():
    torch.manual_seed(0)
    model = _CastsBetween().eval()
    calib = [torch.randn(4, 16) for _ in range(3)]
    q = cpuboost.quantize(model, calib)
    record = cpuboost.report_of(q).pass_named("int8_hand_off")
    assert record.applied == ["a -> b"] and q.wi.out_q is None
    assert [where for where, _ in record.skipped] == ["wi -> wo"]
    assert "output moved" in record.skipped[0][1]
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > MIN_TOY_SQNR  # 1.7 dB on T5 with the hand-off


def test_result_does_not_depend_on_thread_count():
    case, model = toy("conv_bn")
    calib = _calib(case)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(cpuboost.quantize(model, calib))
    one, two = (_int8_layers(r) for r in results)
    for name in (n for n in one if isinstance(one[n], _Int8)):
        assert one[name].x_scale == pytest.approx(two[name].x_scale, rel=1e-5)
        assert abs(one[name].x_zp - two[name].x_zp) <= 1
    x = case.inputs(4)
    for threads in (1, 2):  # and inference at either count
        torch.set_num_threads(threads)
        assert sqnr_db(run(results[0], case, x), run(results[1], case, x)) > 35


def test_nan_in_calibration_data_names_the_layer():
    case, model = toy("mlp_bn")
    bad = case.inputs(4)[0].clone()
    bad[1, 3] = float("nan")
    with pytest.raises(CalibrationError, match=r"'net\.0'.*NaN"):
        cpuboost.quantize(model, [case.inputs(4), (bad,)])


class _Scaled(nn.Module):
    """Activations of 1e30 between two Linears (finite, far beyond any int range)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(self.a(x) * 1e30) * 1e-30


def test_huge_activations_neither_crash_nor_pass_silently():
    torch.manual_seed(0)
    model = _Scaled().eval()
    q = cpuboost.quantize(model, [torch.randn(4, 8) for _ in range(3)],
                          StaticInt8Config(observer="minmax"))
    notes = cpuboost.report_of(q).pass_named("calibrate").notes
    assert any(n.startswith("b: huge input range") for n in notes)  # b's input is 1e30-scale
    assert not any(n.startswith("a:") for n in notes)  # a's input is not
    x = torch.randn(4, 8)
    assert sqnr_db(model(x), q(x)) > MIN_TOY_SQNR


def test_nothing_to_quantize_raises_and_leaves_the_model():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)).eval()
    with pytest.raises(UnsupportedRequestError, match="no layer it could make int8"):
        cpuboost.quantize(model, [torch.tensor([[1, 2]])])
    case, mlp = toy("mlp_bn")
    with pytest.raises(UnsupportedRequestError, match="skip pattern"):
        cpuboost.quantize(mlp, _calib(case), StaticInt8Config(skip=("net.*",)))


def test_skip_keeps_matching_layers_float():
    case, model = toy("mlp_bn")
    q = cpuboost.quantize(model, _calib(case), StaticInt8Config(skip=("net.4",)))
    assert isinstance(q.net[0], Int8Linear) and not isinstance(q.net[4], _Int8)
    assert ("net.4", "kept in float: matches skip pattern 'net.4'") in \
        cpuboost.report_of(q).pass_named("quantize").skipped


def test_calibration_data_forms_agree():
    case, model = toy("conv_bn")
    calib = _calib(case)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.cat([c[0] for c in calib]), torch.zeros(16)), batch_size=4)
    made = [cpuboost.quantize(model, calib),
            cpuboost.quantize(model, iter(calib)),
            cpuboost.quantize(model, lambda m: [m(x) for x, _ in loader],
                              example_inputs=calib[0])]
    scales = [[m.x_scale for m in _int8_layers(q).values() if isinstance(m, _Int8)] for q in made]
    assert scales[0] == scales[1] == scales[2]


def test_bad_requests_raise_before_anything_changes():
    case, model = toy("conv_bn")
    with pytest.raises(ConfigError, match="calib_data"):
        cpuboost.quantize(model)
    with pytest.raises(ConfigError, match="example_inputs"):
        cpuboost.quantize(model, lambda m: m(*case.inputs(2)))
    with pytest.raises(ConfigError, match="observer"):
        StaticInt8Config(observer="kl")
    with pytest.raises(ConfigError, match="skip"):
        StaticInt8Config(skip="fc")
    with pytest.raises(SampleInputError, match="first calibration item"):
        cpuboost.quantize(model, [("not a tensor",)])
    with pytest.raises(CalibrationError, match="tuple of positional"):
        cpuboost.quantize(model, [case.inputs(2), ("not a tensor",)])
    with pytest.raises(CalibrationError, match="none of the layers"):
        cpuboost.quantize(model, lambda m: None, example_inputs=case.inputs(2))


def test_custom_method_and_inplace():
    case, model = toy("custom_method")
    calib = _calib(case)
    expected = cpuboost.quantize(model, calib)
    q = cpuboost.quantize(model, calib, inplace=True)
    assert q is model and _int8_layers(model)
    x = case.inputs(3)
    assert torch.equal(run(q, case, x), run(expected, case, x))


def test_graph_mode_compiles_the_int8_model():
    case, model = toy("residual")
    calib = _calib(case)
    eager = cpuboost.quantize(model, calib)
    compiled = cpuboost.quantize(model, calib, graph_mode=True)
    x = case.inputs(4)
    assert sqnr_db(run(eager, case, x), run(compiled, case, x)) > 30
    report = cpuboost.report_of(compiled)
    assert report.applied("graph_mode")
    # the stem's output feeds block 0's conv1 and its residual add: quantized once
    assert report.applied("quantize_shared_outputs") == [
        "blocks.1.downsample.0: output (read only by residual adds) quantized to its "
        "calibrated range",
        "stem: output quantized once for blocks.0.conv1 and the residual add"]
    assert compiled.stem.output_grid == (compiled.blocks[0].conv1.x_scale,
                                         compiled.blocks[0].conv1.x_zp)
    # the downsample's grid covers what calibration saw at its output (BatchNorm folded in)
    ds = compiled.blocks[1].downsample[0]
    float_ds = model.blocks[1].downsample
    with torch.no_grad():
        seen = torch.cat([float_ds(model.blocks[0](model.stem(*c))).flatten() for c in calib])
    scale, zp = ds.output_grid
    assert ds.output_grid == ds.residual_grid
    assert abs((0 - zp) * scale - seen.min().item()) <= scale
    assert abs((255 - zp) * scale - seen.max().item()) <= scale
    # eager int8 keeps the residual float; the recipe carries the grid to a re-quantization
    assert eager.blocks[1].downsample[0].output_grid is None
    recipe = cpuboost.quantization.recipe_of(compiled)
    assert (recipe.layers["blocks.1.downsample.0"].output_scale,
            recipe.layers["blocks.1.downsample.0"].output_zero_point) == (scale, zp)
    again = cpuboost.quantize(model, recipe=recipe, example_inputs=calib[0], graph_mode=True)
    assert again.blocks[1].downsample[0].output_grid == (scale, zp)
    assert torch.equal(run(again, case, x), run(compiled, case, x))


class _PooledStem(nn.Module):
    """conv -> BatchNorm -> ReLU -> max pool, read by two convs (ResNet's stem)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.pool(self.relu(self.bn(self.stem(x))))
        return self.fc((self.a(y) * self.b(y)).mean((2, 3)))


@pytest.mark.slow
def test_graph_mode_quantizes_before_max_pooling():
    torch.manual_seed(0)
    model = _PooledStem().eval()
    model.bn.running_mean.uniform_(-1, 1)
    calib = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    eager = cpuboost.quantize(model, calib)
    compiled = cpuboost.quantize(model, calib, graph_mode=True)
    assert compiled.a.x_scale == compiled.b.x_scale and compiled.a.x_zp == compiled.b.x_zp
    assert compiled.stem.output_grid == (compiled.a.x_scale, compiled.a.x_zp)
    assert cpuboost.report_of(compiled).applied("quantize_shared_outputs") == [
        "stem: output quantized for a, b (max pooling runs on uint8)"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        # max commutes with rounding to the grid: the same uint8 values reach a and b
        assert sqnr_db(eager(x), compiled(x)) > 35


class _SeparableConv1d(nn.Module):
    """ConvBERT's span-based attention in small: a depthwise Conv1d (k=9) and a pointwise one
    over the sequence, multiplied by a linear projection."""

    def __init__(self, c=32, out=16, k=9):
        super().__init__()
        self.lin, self.q = nn.Linear(c, c), nn.Linear(c, out)
        self.depthwise = nn.Conv1d(c, c, k, groups=c, padding=k // 2, bias=False)
        self.pointwise = nn.Conv1d(c, out, 1)

    def forward(self, x):  # (batch, length, c)
        y = self.pointwise(self.depthwise(self.lin(x).transpose(1, 2))).transpose(1, 2)
        return y * self.q(x)


def test_graph_mode_compiles_int8_conv1d():
    # traced as conv1d, Inductor's int8 conv lowering made the depthwise output 8 longer (its
    # shape read k from the packed weight's height): the compile failed and the model ran eager
    torch.manual_seed(0)
    model = _SeparableConv1d().eval()
    calib = [torch.randn(1, 24, 32) for _ in range(3)]
    eager = cpuboost.quantize(model, calib)
    compiled = cpuboost.quantize(model, calib, graph_mode=True)
    x = torch.randn(1, 24, 32)
    with torch.no_grad():
        out = compiled(x)
        assert sqnr_db(eager(x), out) > 35 and sqnr_db(model(x), out) > MIN_TOY_SQNR
    record = cpuboost.report_of(compiled).pass_named("graph_mode")
    assert not record.skipped and not compiled.forward.failed
    assert isinstance(compiled.depthwise, Int8Conv) and isinstance(compiled.pointwise, Int8Conv)


class _Doubled(nn.Module):
    """conv -> y + y: both sides of the add are the same conv output, so there is no second
    conv to fuse the add into and the output keeps no grid of its own."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.head(y + y)


def test_a_conv_added_to_itself_gets_no_residual_grid_and_compiler_failures_fall_back():
    """``conv(x) + conv(x)`` gets no grid. Inductor's int8 add fusion then asserts on it (a
    torch bug): graph mode runs the model uncompiled, int8 layers packed again, with a warning
    and a report entry, instead of failing the user's call."""
    torch.manual_seed(0)
    model = _Doubled().eval()
    calib = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    eager = cpuboost.quantize(model, calib)
    with pytest.warns(RuntimeWarning, match="the compiler failed on _Doubled"):
        q = cpuboost.quantize(model, calib, graph_mode=True)
    assert q.conv.residual_grid is None and q.conv.output_grid is None
    report = cpuboost.report_of(q)
    assert not report.applied("quantize_shared_outputs")
    assert any("forward runs eager" in why for _, why in report.pass_named("graph_mode").skipped)
    assert q.conv.packed and q.head.packed
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(q(x), eager(x))


class _Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = kind(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        out, _ = self.rnn(x)  # (B, T, 32)
        return self.head(out[:, -1])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("config", [DynamicInt8Config(),
                                    DynamicInt8Config(weight_granularity="per_tensor")])
def test_lstm_and_gru_become_dynamic_int8_and_round_trip(kind, config, tmp_path):
    torch.manual_seed(0)
    model = _Recurrent(kind).eval()
    x = torch.randn(3, 12, 16)
    q = cpuboost.quantize(model, config=config, example_inputs=x)
    assert type(q.rnn).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert sqnr_db(model(x), q(x)) > MIN_TOY_SQNR
    assert any(a.startswith("rnn:") and "SQNR" in a
               for a in cpuboost.report_of(q).applied("quantize"))
    cpuboost.save_quantized(q, tmp_path / "m")
    loaded = cpuboost.load_quantized(lambda: _Recurrent(kind).eval(), tmp_path / "m")
    assert torch.equal(loaded(x), q(x))


@pytest.mark.parametrize("config", [StaticInt8Config(), DynamicInt8Config()],
                         ids=["static", "dynamic"])
def test_transformers_conv1d_layers_quantize_accurately(config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=500, bos_token_id=0,
        eos_token_id=0)).eval()
    ids = torch.randint(0, 500, (2, 12))
    calib = [{"input_ids": torch.randint(0, 500, (2, 12))} for _ in range(3)]
    q = cpuboost.quantize(model, None if config.dynamic else calib, config,
                          example_inputs={"input_ids": ids})
    applied = cpuboost.report_of(q).applied("quantize")
    assert len(applied) == 8  # c_attn, c_proj, c_fc, c_proj per block; lm_head is tied
    assert all(float(a.split("SQNR ")[1].split(" dB")[0]) > 30 for a in applied)
    with torch.no_grad():
        assert cosine(model(input_ids=ids).logits, q(input_ids=ids).logits) > 0.999


def test_a_model_reading_its_convs_attributes_runs_in_int8():
    """MobileNetV2's TF-style padding reads each conv's kernel_size, stride and dilation in
    forward: the int8 conv has nn.Conv's attributes (it raised AttributeError)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(
        image_size=64, num_labels=10)).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # random statistics: the output is not ~0
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    data = [{"pixel_values": torch.randn(2, 3, 64, 64)} for _ in range(3)]
    q = cpuboost.quantize(model, data)
    conv = next(m for m in q.modules() if isinstance(m, Int8Conv) and m.groups > 1)
    assert (conv.kernel_size, conv.in_channels, conv.padding_mode) == ((3, 3), conv.groups,
                                                                       "zeros")
    with torch.no_grad():
        assert cosine(model(**data[0]).logits, q(**data[0]).logits) > 0.999


@pytest.mark.parametrize("own", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["conv_bn", "mlp_bn", "transformer_encoder", "recommender"])
def test_int8_model_of_a_low_precision_model_returns_its_dtype(name, own):
    """A layer handed uint8 by the int8 layer before it returned float32 in a bf16/fp16 model
    (the last Linear of an MLP, a recommender's head)."""
    case, model = toy(name)
    model = model.to(own)
    cast = lambda args: tuple(t.to(own) if t.is_floating_point() else t for t in args)  # noqa: E731
    x = cast(case.inputs(2))
    with torch.no_grad():
        expected = model(*x)
        q = cpuboost.quantize(model, [cast(case.inputs(2)) for _ in range(3)])
        out = q(*x)
    expected, out = (t[0] if isinstance(t, tuple) else t for t in (expected, out))
    assert out.dtype == expected.dtype
    assert cosine(expected.float(), out.float()) > 0.999
