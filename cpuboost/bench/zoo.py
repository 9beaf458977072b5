"""The benchmark suite: models built offline from configs with random weights (no downloads)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


class Cycle:
    """Inputs that change every call (one call = one request), e.g. varying sequence lengths."""

    def __init__(self, items: list):
        self.items, self._next = items, 0

    def first(self):
        return self.items[0]

    def take(self):
        item = self.items[self._next % len(self.items)]
        self._next += 1
        return item

    def fresh(self) -> "Cycle":
        """An independent cursor over the same items, so each variant sees the same order."""
        return Cycle(self.items)


@dataclass(frozen=True)
class Generate:
    """One request = ``model.generate(**kwargs)``; ``forward_inputs`` is what optimize() checks
    numerics on (generate calls forward at every step)."""
    forward_inputs: dict
    kwargs: dict


@dataclass(frozen=True)
class BenchCase:
    name: str
    build: Callable[[], tuple[nn.Module, dict]]  # -> (eval model, keyword inputs)
    quick: bool = True  # part of `cpuboost bench --quick`
    # int8 calibration inputs, other than the timed ones (None: the timed sample itself)
    calib: Optional[Callable[[], list]] = None
    int8: bool = True  # run the int8 variants (LLM generation has its own weight-only path)
    llm: bool = False  # a causal LM's generate(): run the cpuboost.llm.optimize variants


def _resnet50(batch: int):
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig()).eval()  # ResNetConfig() is ResNet-50
    return model, {"pixel_values": torch.randn(batch, 3, 224, 224)}


def _bert(batch: int, seq: int = 128):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(), add_pooling_layer=True).eval()  # BertConfig() is bert-base
    ids = torch.randint(1000, 30000, (batch, seq))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class DLRM(nn.Module):
    """DLRM-like: 8 EmbeddingBag tables 100k x 64, bottom MLP 13-512-256-64, top MLP over the
    concatenation of the dense projection and the pooled embeddings (9 x 64)."""

    def __init__(self, tables: int = 8, rows: int = 100_000, dim: int = 64):
        super().__init__()
        self.embs = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum") for _ in range(tables))
        self.bottom = nn.Sequential(nn.Linear(13, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                    nn.Linear(256, dim), nn.ReLU())
        self.top = nn.Sequential(nn.Linear(dim * (tables + 1), 512), nn.ReLU(),
                                 nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 1), nn.Sigmoid())

    def forward(self, dense, indices, offsets):
        # dense: (B, 13); indices: (T, B*L) int64; offsets: (T, B)
        pooled = [emb(indices[t], offsets[t]) for t, emb in enumerate(self.embs)]  # T x (B, dim)
        x = torch.cat([self.bottom(dense)] + pooled, dim=1)  # (B, (T+1)*dim)
        return self.top(x)


def _dlrm_inputs(batch: int, bag: int = 4, tables: int = 8, rows: int = 100_000) -> dict:
    indices = torch.randint(0, rows, (tables, batch * bag))
    offsets = torch.arange(0, batch * bag, bag).repeat(tables, 1)
    return {"dense": torch.randn(batch, 13), "indices": indices, "offsets": offsets}


def _dlrm(batch: int, bag: int = 4):
    torch.manual_seed(0)
    model = DLRM().eval()
    return model, _dlrm_inputs(batch, bag, len(model.embs))


def _calib_images(n: int = 4) -> list:
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(1, 3, 224, 224, generator=g)} for _ in range(n)]


def _calib_text(lengths=(128, 96, 128, 64)) -> list:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(1000, 30000, (1, n), generator=g)),
             "attention_mask": torch.ones_like(ids)} for n in lengths]


def _calib_dlrm(bag: int = 4) -> list:
    torch.manual_seed(1)
    return [_dlrm_inputs(256, bag)]


def _bert_dynamic(lengths=(17, 45, 64, 99, 128)):
    model, _ = _bert(1)
    gen = torch.Generator().manual_seed(0)
    items = []
    for n in lengths:
        ids = torch.randint(1000, 30000, (1, n), generator=gen)
        items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return model, Cycle(items)


def _gpt2_generate(new_tokens: int = 32, prompt: int = 16):
    """GPT-2 (124M) greedy generation of exactly ``new_tokens`` tokens after a random prompt."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()  # GPT2Config() is gpt2 (124M)
    ids = torch.randint(1000, 30000, (1, prompt), generator=torch.Generator().manual_seed(0))
    return model, Generate({"input_ids": ids}, dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id))


CASES = {c.name: c for c in [
    BenchCase("resnet50_bs1", lambda: _resnet50(1), calib=_calib_images),
    BenchCase("resnet50_bs16", lambda: _resnet50(16), quick=False, calib=_calib_images),
    BenchCase("bert_base_bs1_s128", lambda: _bert(1), calib=_calib_text),
    BenchCase("bert_base_bs8_s128", lambda: _bert(8), quick=False, calib=_calib_text),
    BenchCase("dlrm_bs256", lambda: _dlrm(256), calib=_calib_dlrm),
    BenchCase("dlrm_bs256_bag20", lambda: _dlrm(256, bag=20), quick=False,
              calib=lambda: _calib_dlrm(20)),
    BenchCase("bert_base_dynamic_lengths", _bert_dynamic, quick=False, calib=_calib_text),
    BenchCase("gpt2_generate_32", _gpt2_generate, quick=False, int8=False, llm=True),
]}


def user_case(spec: str) -> BenchCase:
    """``pkg.mod:factory`` where ``factory()`` returns (model, inputs); inputs may be a tensor,
    a tuple of positional arguments, or a dict of keyword arguments."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model expects 'package.module:factory', got {spec!r}.")
    factory = getattr(importlib.import_module(module_name), attr)

    def build():
        model, inputs = factory()
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        return model.eval(), inputs

    return BenchCase(spec, build)
