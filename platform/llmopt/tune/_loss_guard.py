"""Which strategies will miss the search's loss ceiling, before they run.

Every trial trains on the same number of tokens, so a strategy's held-out loss at the end depends first on
how far its optimizer can move: the optimizer steps the token budget buys (fewer with a larger micro-batch
x accumulation) times its learning rate, times the adapter's update scale where peft multiplies the
adapter's product by one (`alpha / r` for LoRA, DoRA, LoHa and LoKr: Adam moves each adapter entry by about
the learning rate a step, so the weight update moves by the scale times that). `progress = log(steps x lr x
scale)` orders the trials of one method family (LoRA, LoRA on a quantized base, full fine-tune) well: on the
shipped search the misses were the strategies with few, large steps at a low rate, and at the baseline's
steps and rate its own r8 at alpha 8 (scale 1) in bf16 missed by 0.005 where r4, r8 and r16 at twice the
scale met the ceiling by 0.014 to 0.05. A quantized base is a family of its own: its adapters also absorb
the quantization error, and on the shipped search a QLoRA run at half the baseline's progress missed by
0.12 where LoRA runs at that progress missed by a few thousandths.

`LossGuard` holds the finished trials' (family, progress, held-out loss, optimizer steps), the baseline's
among them, and judges a candidate before it runs, in this order:

* a finished run of its family with at least its progress and steps that missed the ceiling by more than
  run-to-run noise: the loss falls with both, so the candidate lands higher still;
* when the ceiling is the baseline's own loss: fewer optimizer steps than the baseline's, until a finished
  run of the family with as few met it. Trading steps for rate does not hold on a small budget: on the
  shipped search every run at half the baseline's steps missed, by 0.007 to 0.12, including those whose
  higher rate and scale gave them more steps x lr x scale than the baseline's;
* with three or more observations of its family: a line `loss = a + b * progress` by least squares; a
  candidate is projected to miss when its predicted loss, less the line's residual spread, is still over
  the ceiling, and its progress is not above every observation (a high rate can diverge: the line says
  nothing there);
* with fewer: the prior that a candidate will not reach the baseline's loss with less progress than the
  baseline's. In the baseline's family that holds when the ceiling is the baseline's own loss (within the
  tolerance a ceiling is met by): the loss falls with progress, so less of it lands over the ceiling, as
  every such run of the shipped search did. A looser ceiling leaves room: there the prior prunes only under
  half the baseline's progress. In another family it is under the baseline's progress either way (nothing
  measured yet says that it learns faster per step; on the shipped search full fine-tunes at 1/12 of the
  baseline's progress landed 1.7 over it).

A projected miss is pruned like a strategy the cost model says cannot fit: it costs no run, and the searcher
sees the worst score and moves away from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmopt.config import RunConfig

PRIOR_FRACTION = 0.5  # a ceiling looser than the baseline's loss: under half its progress misses
STRICT_FRACTION = 1.0  # the ceiling is the baseline's loss: under its progress misses
OTHER_FAMILY_FRACTION = 1.0  # another family than the baseline's: under its progress
MIN_OBSERVATIONS = 3
# Held-out losses within this share of the ceiling meet it: the template's own training computed in
# another order (a ZeRO stage, checkpointing) lands a few 1e-6 from the template's loss, which is the
# ceiling under `baseline`; a strict comparison made those runs a coin toss.
LOSS_TOLERANCE = 1e-4
# Run-to-run noise of a held-out loss, as a share of it: the template's training in bf16 instead of fp32
# landed 0.005 (0.2%) over its own loss.
NOISE_SHARE = 0.002
SCALED_METHODS = frozenset({"lora", "dora", "loha", "lokr"})  # peft multiplies their product by alpha / r


def highest_meeting(ceiling: float) -> float:
    """The highest held-out loss that meets `ceiling` (within `LOSS_TOLERANCE` of it)."""
    return ceiling * (1 + LOSS_TOLERANCE)


def family(config: RunConfig) -> str:
    """`full`, or the peft method (`lora`, `dora`, `ia3`, ...), prefixed `q` on a quantized base
    (`qlora`): methods learn at different rates for the same steps x learning rate."""
    if not config.lora.enabled:
        return "full"
    return config.lora.method if config.quantization.mode == "none" else f"q{config.lora.method}"


def update_scale(config: RunConfig) -> float:
    """What peft multiplies the adapter's product by (`alpha / r`), or 1 (a full fine-tune, IA3, prompts)."""
    lora = config.lora
    if lora.enabled and lora.method in SCALED_METHODS:
        return lora.alpha / lora.r
    return 1.0


def progress(steps: int, lr: float, scale: float = 1.0) -> float:
    """log(optimizer steps x learning rate x the adapter's update scale)."""
    return math.log(max(steps, 1) * lr * scale)


@dataclass(frozen=True)
class Observation:
    family: str
    progress: float
    loss: float
    steps: int = 0  # optimizer steps; 0: unknown


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
        return a, b, max(spread, NOISE_SHARE * abs(mean_l))

    def _all(self) -> list[Observation]:
        return [*([self.reference] if self.reference else []), *self.observations]

    def judge(self, kind: str, value: float, steps: int = 0) -> str | None:
        """Why a candidate of family `kind` at `progress` `value` taking `steps` optimizer steps (0:
        unknown) will miss the ceiling, or None."""
        return (
            self._dominated(kind, value, steps)
            or self._too_few_steps(kind, steps)
            or self._projected(kind, value)
        )

    def _strict(self) -> bool:
        """The ceiling is the baseline's own loss (within the tolerance a ceiling is met by)."""
        return self.reference is not None and self.ceiling <= self.reference.loss * (1 + LOSS_TOLERANCE)

    def _dominated(self, kind: str, value: float, steps: int) -> str | None:
        """A finished run of the family with at least the candidate's progress and steps missed the ceiling
        by more than run-to-run noise: the loss falls with both, so the candidate lands higher still."""
        over = highest_meeting(self.ceiling) + NOISE_SHARE * self.ceiling
        for o in self._all():
            if o.family != kind or o.loss <= over or o.progress < value - 1e-9:
                continue
            if steps and o.steps and o.steps < steps:
                continue
            return (
                f"projected to miss the loss ceiling: a finished {kind} run with at least its steps x lr x "
                f"scale ({math.exp(o.progress):.3g} >= {math.exp(value):.3g}) and steps landed at "
                f"{o.loss:.4f} > {self.ceiling:.4f}"
            )
        return None

    def _too_few_steps(self, kind: str, steps: int) -> str | None:
        """Under the baseline's ceiling, fewer optimizer steps than the baseline's miss it until a finished
        run of the family with as few met it: on the shipped search every run at half the baseline's steps
        missed by 0.007 to 0.12, a higher rate or scale making up twice the steps x lr or not."""
        ref = self.reference
        if not (steps and ref is not None and ref.steps and steps < ref.steps and self._strict()):
            return None
        met = highest_meeting(self.ceiling)
        if any(
            o.family == kind and o.steps and o.steps <= steps and o.loss <= met for o in self.observations
        ):
            return None
        return (
            f"projected to miss the loss ceiling: {steps} optimizer steps on the token budget, under the "
            f"baseline's {ref.steps}, and no finished {kind} run with as few met it"
        )

    def _projected(self, kind: str, value: float) -> str | None:
        fitted = self.fit(kind)
        if fitted is not None:
            a, b, spread = fitted
            highest = max(o.progress for o in self._all() if o.family == kind)
            predicted = a + b * value
            if value <= highest and predicted - spread > self.ceiling:
                return (
                    f"projected to miss the loss ceiling: held-out loss {predicted:.4f} (+-{spread:.4f}) > "
                    f"{self.ceiling:.4f} at log(steps x lr x scale) {value:.2f}, from {self._count(kind)} "
                    "finished runs"
                )
            return None
        ref = self.reference
        if ref is None:
            return None
        if kind != ref.family:
            fraction = OTHER_FAMILY_FRACTION
        elif self._strict():
            fraction = STRICT_FRACTION
        else:
            fraction = PRIOR_FRACTION
        # The tolerance keeps a run at the baseline's own progress (the same steps, rate and scale computed
        # another way) from being pruned by rounding.
        if value < ref.progress + math.log(fraction) - 1e-9:
            share = f"under {fraction:g} of" if fraction != 1 else "under"
            return (
                f"projected to miss the loss ceiling: steps x lr x scale {math.exp(value):.3g} ({kind}) is "
                f"{share} the baseline's {math.exp(ref.progress):.3g} ({ref.family}) on the same tokens"
            )
        return None

    def _count(self, kind: str) -> int:
        return sum(1 for o in self._all() if o.family == kind)
