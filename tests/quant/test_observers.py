"""Observers: exact statistics, a clip range that beats min/max on outliers, and clear errors."""
import math

import pytest
import torch

from cpuboost.errors import CalibrationError
from cpuboost.nn.int8 import affine_qparams
from cpuboost.quant.observers import HistogramObserver, MinMaxObserver, PercentileObserver


def _qdq_mse(x: torch.Tensor, lo: float, hi: float) -> float:
    scale, zp = affine_qparams(lo, hi, 255, False)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return ((q - zp) * scale - x).pow(2).mean().item()


def _outlier_data():
    torch.manual_seed(0)
    x = torch.randn(1_000_000)
    x[7] = 200.0  # one outlier: worth clipping (for squared error) once the sample is large
    return x


def test_minmax_is_the_exact_range_over_batches():
    obs = MinMaxObserver("fc")
    obs.observe(torch.tensor([-1.0, 2.0]))
    obs.observe(torch.tensor([0.5, 3.5]))
    assert obs.clip_range() == (-1.0, 3.5) and obs.batches == 2


def test_histogram_clips_outliers_and_beats_minmax():
    x = _outlier_data()
    hist, mm = HistogramObserver("fc"), MinMaxObserver("fc")
    for chunk in x.chunk(4):
        hist.observe(chunk)
        mm.observe(chunk)
    assert int(hist.counts.sum()) == x.numel()  # growing the range loses no counts
    lo, hi = hist.clip_range()
    assert hi < 100  # the outlier is clipped (the squared-error optimum is ~86)
    assert _qdq_mse(x, lo, hi) < 0.5 * _qdq_mse(x, *mm.clip_range())


@pytest.mark.parametrize("dist", [torch.distributions.Normal(0.0, 1.0),
                                  torch.distributions.Laplace(0.0, 1.0),
                                  torch.distributions.StudentT(2.0)])
def test_histogram_is_never_worse_than_minmax(dist):
    torch.manual_seed(0)
    x = dist.sample((100_000,))
    hist = HistogramObserver("fc")
    hist.observe(x)
    assert _qdq_mse(x, *hist.clip_range()) <= _qdq_mse(x, x.min().item(), x.max().item())


def test_histogram_keeps_the_range_of_well_behaved_data():
    torch.manual_seed(0)
    x = torch.rand(50_000) * 4 - 1  # uniform [-1, 3]: clipping only adds error
    hist = HistogramObserver("fc")
    hist.observe(x)
    lo, hi = hist.clip_range()
    assert lo == pytest.approx(-1.0, abs=0.05) and hi == pytest.approx(3.0, abs=0.05)


def test_percentile_clips_at_the_requested_tail():
    x = _outlier_data()
    obs = PercentileObserver("fc", percentile=99.9)
    obs.observe(x)
    lo, hi = obs.clip_range()
    expected = torch.quantile(x[:500_000], 0.999).item()  # quantile() limits its input size
    assert hi == pytest.approx(expected, rel=0.1) and lo < 0


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_nan_or_inf_raises_naming_the_layer(bad, word):
    obs = HistogramObserver("encoder.layer.3.output.dense")
    x = torch.randn(10)
    x[4] = bad
    with pytest.raises(CalibrationError, match=rf"encoder\.layer\.3\.output\.dense.*{word}"):
        obs.observe(x)


@pytest.mark.parametrize("kind", [MinMaxObserver, HistogramObserver, PercentileObserver])
def test_huge_and_constant_ranges_give_usable_qparams(kind):
    for data in (torch.tensor([1e30, -3e35, 0.5]), torch.zeros(16),
                 torch.tensor([3.0e38, -3.0e38])):
        obs = kind("fc")
        obs.observe(data)
        scale, zp = affine_qparams(*obs.clip_range(), 255, False)
        assert math.isfinite(scale) and scale > 0 and math.isfinite(1.0 / scale)
        assert 0 <= zp <= 255 and isinstance(zp, int)


def test_histogram_growth_over_many_orders_of_magnitude():
    obs = HistogramObserver("fc")
    obs.observe(torch.tensor([0.0, 1e-3]))
    obs.observe(torch.tensor([1e20]))
    obs.observe(torch.tensor([-1e25]))
    assert int(obs.counts.sum()) == 4
    assert obs.left <= -1e25 and obs.left + obs.width > 1e20


def test_symmetric_qparams_center_zero():
    scale, zp = affine_qparams(-1.0, 3.0, 255, True)
    assert zp == 128 and scale == pytest.approx(6.0 / 255)


def _outlier_rows(outlier_weight: float):
    """A Linear's calibration rows: Gaussian, with channel 0 carrying rare large values (a
    transformer's outlier feature); ``outlier_weight`` is how much the layer reads it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[:, 0] = outlier_weight
    calib = []
    for _ in range(4):
        x = torch.randn(64, 64)
        x[::8, 0] = torch.linspace(20, 60, 8)
        calib.append((x,))
    return torch.nn.Sequential(lin).eval(), calib


def _stats(calib):
    from cpuboost.quant.smooth import ChannelStats
    stats = ChannelStats()
    for (x,) in calib:
        stats.observe(x)
    return stats


@pytest.mark.parametrize("outlier_weight, expected", [(1.0, 1), (0.0, 0)])
def test_clip_is_judged_by_the_int8_output_error(outlier_weight, expected):
    """Clipping channel 0 at 8 costs output accuracy only where the weights read channel 0."""
    from cpuboost.quant.smooth import judge_clip
    model, calib = _outlier_rows(outlier_weight)
    clip, full = affine_qparams(-4.0, 8.0, 255), affine_qparams(-4.0, 60.0, 255)
    best, errs = judge_clip(_stats(calib), model[0].weight, [clip, full], 255, True)
    assert best == expected and errs[expected] < errs[1 - expected]


def test_quantize_keeps_the_full_range_where_the_clip_costs_output_accuracy(monkeypatch):
    """Wiring: where the histogram's clip (here forced to 8, as it clips GELU outputs' long
    tails in all-MiniLM-L6-v2) makes the int8 output worse, quantize uses the observed range,
    says so, and the output is the better for it."""
    import cpuboost
    from cpuboost.verify import sqnr_db
    model, calib = _outlier_rows(outlier_weight=1.0)
    clipped = cpuboost.quantize(model, calib, cpuboost.StaticInt8Config(observer="percentile",
                                                                        percentile=99.0))
    monkeypatch.setattr(HistogramObserver, "clip_range", lambda self: (self.lo, 8.0))
    q = cpuboost.quantize(model, calib)
    notes = cpuboost.report_of(q).pass_named("quantize").notes
    assert any(n.startswith("0: full observed input range kept") for n in notes), notes
    assert (255 - q[0].x_zp) * q[0].x_scale >= 59.0
    x = calib[0][0]
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > sqnr_db(model(x), clipped(x)) + 6
    ignored, _ = _outlier_rows(outlier_weight=0.0)
    kept = cpuboost.quantize(ignored, calib)
    assert (255 - kept[0].x_zp) * kept[0].x_scale < 9
