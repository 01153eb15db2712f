"""Which strategies will miss the search's loss ceiling, before they run.

Every trial trains on the same number of tokens, so a strategy's held-out loss at the end depends first on
how far its optimizer can move: the optimizer steps the token budget buys (fewer with a larger micro-batch
x accumulation) times its learning rate. `progress = log(steps x lr)` orders the trials of one method
family (LoRA, LoRA on a quantized base, full fine-tune) well: on the shipped search the misses were the
strategies with few, large steps at a low rate. A quantized base is a family of its own: its adapters
also absorb the quantization error, and on the shipped search a QLoRA run at half the baseline's progress
missed by 0.12 where LoRA runs at that progress missed by a few thousandths.

`LossGuard` holds the finished trials' (family, progress, held-out loss), the baseline's among them, and
judges a candidate before it runs:

* with three or more observations of its family: a line `loss = a + b * progress` by least squares; a
  candidate is projected to miss when its predicted loss, less the line's residual spread, is still over
  the ceiling, and its progress is not above every observation (a high rate can diverge: the line says
  nothing there);
* with fewer: the prior that a candidate will not reach the baseline's loss (the ceiling is the baseline's
  loss, or near it) with under half the baseline's progress in the baseline's family, or with less
  progress than the baseline's in another family (nothing measured yet says that it learns faster per
  step; on the shipped search full fine-tunes at 1/12 of the baseline's progress landed 1.7 over it).

A projected miss is pruned like a strategy the cost model says cannot fit: it costs no run, and the searcher
sees the worst score and moves away from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmopt.config import RunConfig

PRIOR_FRACTION = 0.5  # under half the baseline's steps x lr: projected to miss before any data
OTHER_FAMILY_FRACTION = 1.0  # another family than the baseline's: under its steps x lr
MIN_OBSERVATIONS = 3


def family(config: RunConfig) -> str:
    """`full`, or the peft method (`lora`, `dora`, `ia3`, ...), prefixed `q` on a quantized base
    (`qlora`): methods learn at different rates for the same steps x learning rate."""
    if not config.lora.enabled:
        return "full"
    return config.lora.method if config.quantization.mode == "none" else f"q{config.lora.method}"


def progress(steps: int, lr: float) -> float:
    """log(optimizer steps x learning rate)."""
    return math.log(max(steps, 1) * lr)


@dataclass(frozen=True)
class Observation:
    family: str
    progress: float
    loss: float


@dataclass
class LossGuard:
    """Projects held-out loss from finished trials; see the module doc."""

    ceiling: float
    reference: Observation | None = None  # the baseline
    observations: list[Observation] = field(default_factory=list)

    def fit(self, kind: str) -> tuple[float, float, float] | None:
        """`(a, b, spread)` of `loss = a + b * progress` over the family's observations, or None (too few,
        or no learning signal: loss not falling with progress)."""
        points = [(o.progress, o.loss) for o in self._all() if o.family == kind]
        if len(points) < MIN_OBSERVATIONS or len({p for p, _ in points}) < 2:
            return None
        mean_p = sum(p for p, _ in points) / len(points)
        mean_l = sum(loss for _, loss in points) / len(points)
        var = sum((p - mean_p) ** 2 for p, _ in points)
        b = sum((p - mean_p) * (loss - mean_l) for p, loss in points) / var
        if b >= 0:
            return None
        a = mean_l - b * mean_p
        residuals = [loss - (a + b * p) for p, loss in points]
        spread = math.sqrt(sum(r * r for r in residuals) / max(1, len(points) - 2))
        return a, b, max(spread, 0.002 * abs(mean_l))

    def _all(self) -> list[Observation]:
        return [*([self.reference] if self.reference else []), *self.observations]

    def judge(self, kind: str, value: float) -> str | None:
        """Why a candidate of family `kind` at `progress` `value` will miss the ceiling, or None."""
        fitted = self.fit(kind)
        if fitted is not None:
            a, b, spread = fitted
            highest = max(o.progress for o in self._all() if o.family == kind)
            predicted = a + b * value
            if value <= highest and predicted - spread > self.ceiling:
                return (
                    f"projected to miss the loss ceiling: held-out loss {predicted:.4f} (+-{spread:.4f}) > "
                    f"{self.ceiling:.4f} at log(steps x lr) {value:.2f}, from {self._count(kind)} finished "
                    "runs"
                )
            return None
        ref = self.reference
        if ref is None:
            return None
        fraction = PRIOR_FRACTION if kind == ref.family else OTHER_FAMILY_FRACTION
        if value < ref.progress + math.log(fraction):
            share = f"under {fraction:g} of" if fraction != 1 else "under"
            return (
                f"projected to miss the loss ceiling: steps x lr {math.exp(value):.3g} ({kind}) is {share} "
                f"the baseline's {math.exp(ref.progress):.3g} ({ref.family}) on the same tokens"
            )
        return None

    def _count(self, kind: str) -> int:
        return sum(1 for o in self._all() if o.family == kind)
