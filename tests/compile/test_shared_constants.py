"""Constants folded by freezing are made once per model, however many graphs it compiles into."""
import pytest
import torch

import cpuboost
from cpuboost.compile import shared_constants as sc
from tests.conftest import rel_err, skip_unless_onednn_packs

transformers = pytest.importorskip("transformers")


def _tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def constants(monkeypatch):
    """Every tensor Inductor registers as a folded constant, in order."""
    from torch._inductor import constant_folding
    seen = []
    original = constant_folding.replace_node_with_constant

    def spy(gm, node, constant=None, name=None):
        if constant is not None:
            seen.append(constant)
        return original(gm, node, constant, name)

    monkeypatch.setattr(constant_folding, "replace_node_with_constant", spy)
    return seen


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_generate_graphs_share_packed_weights(dtype, constants):
    """Prefill (M = prompt length) and decode (M = 1) graphs: each Linear/Conv1D weight packed
    once (for oneDNN, or cpuboost's AVX2 kernel), whichever graph packed it first; the LM head,
    tied to the token embedding, packed too in bf16 (a bf16 copy) and not at all in fp32 (it
    runs on the embedding's weight); tokens as eager."""
    skip_unless_onednn_packs(dtype or torch.float32)
    torch._dynamo.reset()
    model = _tiny_gpt2()
    ids = torch.randint(5, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    opt = cpuboost.optimize(model, dtype=dtype, graph_mode=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = opt.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert opt.forward.graphs >= 2
    # oneDNN's packed tensors, or (fp32 on AVX2 without AVX-512) cpuboost's [N/16, K, 16] panels
    packed = [c for c in constants
              if c.layout == torch._mkldnn or (c.dim() == 3 and c.shape[-1] == 16)]
    weights = 8 if dtype is None else 9  # 2 layers x 4 projections (+ the head in bf16)
    assert len(packed) >= opt.forward.graphs * weights  # per graph...
    assert len({id(c) for c in packed}) == weights  # ... but one tensor each
    if dtype is None:
        assert torch.equal(out, ref)
    else:
        assert (out == ref).float().mean() >= 0.85  # bf16: rounding may flip a late argmax


def test_new_weights_are_never_served_old_constants():
    """The same parameter objects updated in place (load_state_dict) between two compilations:
    the second compiled model uses the new values (the version counter is part of the key)."""
    torch._dynamo.reset()
    model = _tiny_gpt2(0)
    ids = torch.randint(5, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    first = cpuboost.optimize(model, dtype=torch.bfloat16, graph_mode=True)
    with torch.no_grad():
        first(ids)
        model.load_state_dict(_tiny_gpt2(1).state_dict())
        second = cpuboost.optimize(model, dtype=torch.bfloat16, graph_mode=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = model(ids).logits
        out = second(ids).logits
    assert rel_err(ref.float(), out.float()) <= 2e-2


def test_new_data_under_the_same_parameter_is_never_served_old_constants():
    """``param.data = ...`` (and ``module.to(...)``) swap a parameter's data without bumping its
    version: the data pointer and a sample of values are part of the key."""
    torch._dynamo.reset()
    model = _tiny_gpt2(0)
    ids = torch.randint(5, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    other = _tiny_gpt2(1).state_dict()
    with torch.no_grad():
        cpuboost.optimize(model, graph_mode=True)(ids)
        for name, p in model.named_parameters():
            p.data = other[name].clone()
        second = cpuboost.optimize(model, graph_mode=True)
        assert rel_err(model(ids).logits, second(ids).logits) <= 1e-4


def _doubler(w):
    """``make`` for made_once (twice ``w``) and the list of what it made."""
    made = []

    def make():
        made.append(w * 2)
        return made[-1]
    return make, made


def test_made_once_keys_on_identity_and_version():
    w = torch.randn(4, 4)
    make, made = _doubler(w)
    a = sc.made_once(("double",), w, make)
    assert sc.made_once(("double",), w, make) is a and len(made) == 1
    with torch.no_grad():
        w.add_(1)  # in place: a new version, so made again
    b = sc.made_once(("double",), w, make)
    assert b is not a and torch.equal(b, w * 2)
    del a, b, made[:]  # nothing holds the results any more: the entries die with them
    sc.made_once(("double",), w, make)
    assert len(made) == 1


def test_a_pinned_weight_keeps_its_key_across_a_storage_move_until_its_data_changes():
    """Graph mode's inplace=True frees a weight's storage and later unpacks the same values into
    a new one: pinned, it keeps the key its constants were folded under; new data does not."""
    w = torch.randn(8, 4)
    make, made = _doubler(w)
    a = sc.made_once(("double",), w, make)
    sc.pin(w)
    values, nbytes = w.detach().clone(), w.untyped_storage().nbytes()
    w.untyped_storage().resize_(0)
    w.untyped_storage().resize_(nbytes)  # (a new allocation)
    with torch.no_grad():
        w.copy_(values)  # (a new version)
    sc.pin(w)
    assert sc.made_once(("double",), w, make) is a and len(made) == 1
    w.data = values.clone()  # the same values, new data: not what was pinned any more
    assert sc.made_once(("double",), w, make) is not a and len(made) == 2


def test_inference_tensors_are_made_every_time():
    with torch.inference_mode():
        w = torch.randn(3)
    made = [sc.made_once(("copy",), w, w.clone) for _ in range(2)]
    assert made[0] is not made[1] and torch.equal(made[0], w)


def test_records_of_storages_read_as_they_are_expire_with_their_graphs():
    """A graph reads a bias as it is: recorded while it lives, expired once the model and its
    graph are freed (a bare address outlived them, and a later weight allocated there was
    never released by inplace=True)."""
    import gc
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU()).eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        fast = cpuboost.optimize(model, graph_mode=True)
        assert rel_err(model(x), fast(x)) <= 1e-5
    assert sc.read_as_is(model[0].bias)
    ptr = model[0].bias.untyped_storage().data_ptr()
    del fast, model
    torch._dynamo.reset()
    gc.collect()
    assert not any(r() is not None for r in sc._READ_AS_IS.get(ptr, ()))
    with torch.no_grad():  # the next compile drops the dead records
        cpuboost.optimize(torch.nn.Linear(16, 8).eval(), graph_mode=True)(x)
    assert all(r() is not None for refs in sc._READ_AS_IS.values() for r in refs)
