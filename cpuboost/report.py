"""`OptimizationReport`: a plain account of what `optimize` did, skipped, and why."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from cpuboost.errors import InvalidModelError

_REPORT_ATTR = "_cpuboost_report"


@dataclass
class PassRecord:
    name: str
    applied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    dropped: Optional[str] = None  # why the whole pass was undone

    def apply(self, what: str) -> None:
        self.applied.append(what)

    def skip(self, where: str, why: str) -> None:
        self.skipped.append((where, why))


@dataclass
class NumericsCheck:
    max_abs: float
    max_rel: float
    rtol: float
    passed: bool
    compared: int  # number of output tensors compared

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{verdict}: max abs diff {self.max_abs:.3g}, max relative diff {self.max_rel:.3g} "
                f"(tolerance {self.rtol:g}, {self.compared} output tensor(s))")


@dataclass
class OptimizationReport:
    dtype: str
    level: str
    hardware: str
    passes: list[PassRecord] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    numerics: Optional[NumericsCheck] = None
    warnings: list[str] = field(default_factory=list)
    pending: Optional[str] = None  # set while passes wait for the first call
    accuracy: Optional[str] = None  # low-precision result vs the original (e.g. int8 SQNR)
    recipe: Optional[object] = None  # quantization: the per-layer decisions (quant.Recipe)

    def record(self, name: str) -> PassRecord:
        rec = PassRecord(name)
        self.passes.append(rec)
        return rec

    def pass_named(self, name: str) -> Optional[PassRecord]:
        return next((p for p in self.passes if p.name == name), None)

    def applied(self, name: str) -> list[str]:
        rec = self.pass_named(name)
        return list(rec.applied) if rec and not rec.dropped else []

    def __str__(self) -> str:
        lines = [f"cpuboost optimization report (dtype {self.dtype}, level {self.level})",
                 f"  cpu: {self.hardware}"]
        if self.pending:
            lines.append(f"  pending: {self.pending}")
        for rec in self.passes:
            state = f"DROPPED ({rec.dropped})" if rec.dropped else f"{len(rec.applied)} applied"
            lines.append(f"  [{rec.name}] {state}, {len(rec.skipped)} skipped, {rec.seconds:.2f}s")
            lines += [f"      + {what}" for what in rec.applied]
            lines += [f"      - {where}: {why}" for where, why in rec.skipped]
            lines += [f"      * {note}" for note in rec.notes]
        mib = 1 << 20
        lines.append(f"  weights: {self.weight_bytes_before / mib:.1f} MiB before, "
                     f"{self.weight_bytes_after / mib:.1f} MiB after")
        if self.accuracy:
            lines.append(f"  accuracy: {self.accuracy}")
        elif self.numerics:
            lines.append(f"  numerics: {self.numerics}")
        else:
            lines.append("  numerics: not checked (no sample_input)")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def attach(model: torch.nn.Module, report: OptimizationReport) -> None:
    # object.__setattr__ keeps the report out of nn.Module's submodule/parameter bookkeeping.
    object.__setattr__(model, _REPORT_ATTR, report)


def report_of(model: torch.nn.Module) -> OptimizationReport:
    """The report `cpuboost.optimize` attached to the module it returned."""
    report = getattr(model, _REPORT_ATTR, None) if isinstance(model, torch.nn.Module) else None
    if report is None:
        raise InvalidModelError(
            f"{type(model).__name__} carries no cpuboost report; pass the module returned by "
            "cpuboost.optimize(...) (not the original one).")
    return report
