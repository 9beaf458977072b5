import torch
from torch import nn

import cpuboost
from cpuboost.passes.remove_dropout import DropoutIdentity


def test_dropout_replaced_and_keeps_p():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.25), nn.AlphaDropout(0.1)).eval()
    opt = cpuboost.optimize(model, sample_input=torch.randn(2, 4))
    assert isinstance(opt[1], DropoutIdentity) and opt[1].p == 0.25
    assert isinstance(opt[2], DropoutIdentity)
    assert cpuboost.report_of(opt).applied("remove_dropout") == ["1", "2"]


def test_dropout_kept_when_asked():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.25)).eval()
    opt = cpuboost.optimize(model, replace_dropout_with_identity=False)
    assert isinstance(opt[1], nn.Dropout)
