"""Verification: an exported graph's answers compared with a reference's, case by case.

Shared by the build (every export is checked against the eager model, or a user's own graph
against itself run one input at a time) and by the load of an archive made by hand
(:mod:`ts_handlers.handmade`: a batch must answer what each input answers alone), so it imports
only torch and nothing of the build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ts_handlers.artifacts import ExportError

Reference = Callable[..., torch.Tensor]
# Judges one verification case: (expected, actual, inputs) -> (figures, passed). The default
# compares within verify_atol; reduced precision judges with its accuracy gate.
Judge = Callable[
    [torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], tuple[dict[str, float], bool]
]


def one_at_a_time(model: Callable[..., torch.Tensor]) -> Reference:
    """A reference that runs each row of a batch alone (for graphs with no eager model)."""

    def reference(*inputs: torch.Tensor) -> torch.Tensor:
        rows = [model(*(tensor[i : i + 1] for tensor in inputs)) for i in range(len(inputs[0]))]
        return torch.cat(rows)

    return reference


@dataclass
class VerificationReport:
    # What a case must meet: "atol 0.0001", or a reduced precision's gate.
    criterion: str
    # What the exported outputs were compared with: "eager" or "one input at a time".
    reference: str = "eager"
    cases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((case["max_abs_diff"] for case in self.cases), default=0.0)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(case["passed"] for case in self.cases)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs_diff": self.max_abs_diff, "passed": self.passed}

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"verification against {self.reference} ({self.criterion}): {verdict}"]
        for case in self.cases:
            shape = "x".join(str(size) for size in case["shape"])
            status = "ok" if case["passed"] else "MISMATCH"
            detail = case.get("error") or ", ".join(
                f"{name} {value:.2e}" if name == "max_abs_diff" else f"{name} {value:.6g}"
                for name, value in case["figures"].items()
            )
            lines.append(f"  input {shape:>12}: {detail}  {status}")
        return "\n".join(lines)


def verify(
    eager: Callable[..., torch.Tensor],
    exported: Callable[..., torch.Tensor],
    input_sets: Iterable[Sequence[torch.Tensor]],
    atol: float,
    reference: str = "eager",
    judge: Judge | None = None,
    criterion: str = "",
) -> VerificationReport:
    """Runs both models on every input set and records the largest absolute difference.

    Each case passes within ``atol``, or by ``judge`` when one is given (reduced precision).
    A non-finite output fails its case: NaN compares unequal to everything, and an infinity in
    both would otherwise pass as a difference of NaN.
    """
    report = VerificationReport(criterion=criterion or f"atol {atol:g}", reference=reference)
    with torch.inference_mode():
        for inputs in input_sets:
            case: dict[str, Any] = {"shape": list(inputs[0].shape)}
            try:
                expected = eager(*inputs)
                actual = exported(*inputs)
                if expected.shape != actual.shape:
                    raise ExportError(
                        f"shape {tuple(actual.shape)} differs from eager {tuple(expected.shape)}"
                    )
                if not bool(torch.isfinite(actual).all()):
                    raise ExportError("the exported model returned NaN or infinite values")
                diff = (expected.float() - actual.float()).abs().max().item()
                figures, passed = {"max_abs_diff": diff}, diff <= atol
                if judge is not None:
                    judged, passed = judge(expected, actual, inputs)
                    figures.update(judged)
                case.update(max_abs_diff=diff, figures=figures, passed=passed)
            except Exception as error:  # a trace that cannot run at this shape is a failed case
                case.update(max_abs_diff=float("inf"), passed=False, error=str(error)[:200])
            report.cases.append(case)
    return report
