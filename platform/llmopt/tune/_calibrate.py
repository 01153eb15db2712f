"""Calibrate the cost model: measure a few probe strategies here and fit its machine constants.

`calibrate` measures probe strategies of a run's model (`measure`, in this process) and fits the
effective FLOP rate per precision, the per-layer and ZeRO-hook overheads and the optimizer's cost (step
time, each from the part of a step that reveals it), and the fixed per-run bytes and transient-activation
scale (memory). It reports each probe's prediction error,
in-sample and leave-one-out, and caches the result per model and machine, where `llmopt recommend` (and
the search) find it with `load_calibration`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmopt.config import RunConfig, apply_overrides, validate_config
from llmopt.tune._cost import MIB, Coefficients, CostModel
from llmopt.tune._hardware import Hardware
from llmopt.tune._profile import Measurement, measure
from llmopt.tune._shape import model_shape
from llmopt.tune._workload import workload_for

# A Ray Train worker holds more than this process before its model: Ray's core worker and Train
# context (measured on the development machines: ~620 MiB set-up RSS in a worker against ~440 MiB in
# one process for the same tiny run; jobs.benchmark train / outputs/benchmark/train.json).
RAY_WORKER_EXTRA_BYTES = {"cpu": 180 * MIB, "gpu": 0}

# The default probes: small and large micro-batches of LoRA in fp32 and in bf16 (bf16's speed differs by
# CPU and GPU, and each precision's rate is fitted from two probes of its own), and a full fine-tune
# under ZeRO-2 with every layer checkpointed, so that FLOPs, activation bytes, trainable parameters and
# the fixed costs of checkpointing and ZeRO all vary. On a GPU, `auto` precision resolves to bf16.
_LORA = ["lora.enabled=true", "checkpointing.policy=none", "parallelism.zero_stage=0"]
DEFAULT_PROBES: list[tuple[str, list[str]]] = [
    ("lora-mb4", [*_LORA, "training.micro_batch_size=4"]),
    ("lora-packed-mb8", [*_LORA, "data.packing=true", "training.micro_batch_size=8"]),
    ("lora-mb4-bf16", [*_LORA, "training.micro_batch_size=4", "precision=bf16"]),
    ("lora-packed-mb8-bf16", [*_LORA, "data.packing=true", "training.micro_batch_size=8", "precision=bf16"]),
    (
        "full-zero2-uniform",
        [
            "lora.enabled=false",
            "quantization.mode=none",
            "checkpointing.policy=uniform",
            "checkpointing.every_k_layers=1",
            "parallelism.zero_stage=2",
            "parallelism.offload_optimizer=none",
            "data.packing=true",
            "training.micro_batch_size=8",
        ],
    ),
]


@dataclass
class ProbeResult:
    """A probe's measured and predicted figures. Errors are (predicted - measured) / measured;
    `loo_*` predict the probe from a fit on the other probes only (None with fewer than two others)."""

    label: str
    overrides: list[str]
    measured_peak_bytes: int
    predicted_peak_bytes: int
    measured_own_bytes: int
    predicted_own_bytes: int
    measured_step_time_s: float
    predicted_step_time_s: float
    measured_tokens_per_s: float
    predicted_tokens_per_s: float
    memory_error: float = 0.0
    own_memory_error: float = 0.0
    step_time_error: float = 0.0
    loo_memory_error: float | None = None
    loo_step_time_error: float | None = None


@dataclass
class Calibration:
    """Fitted cost-model constants for one model on one machine, with the probes that fitted them."""

    model: str
    machine: str
    hardware: dict[str, Any]
    coefficients: Coefficients
    in_process_runtime_bytes: int
    worker_extra_bytes: int
    probes: list[ProbeResult] = field(default_factory=list)
    created: str = ""
    source: str = "profile"
    path: str | None = None

    def summary(self) -> dict[str, float]:
        """Mean absolute errors over the probes (fractions)."""

        def mean(values):
            values = [abs(v) for v in values if v is not None]
            return sum(values) / len(values) if values else float("nan")

        return {
            "memory_error": mean(p.memory_error for p in self.probes),
            "own_memory_error": mean(p.own_memory_error for p in self.probes),
            "step_time_error": mean(p.step_time_error for p in self.probes),
            "loo_memory_error": mean(p.loo_memory_error for p in self.probes),
            "loo_step_time_error": mean(p.loo_step_time_error for p in self.probes),
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | None = None) -> Calibration:
        data = dict(data)
        data["coefficients"] = Coefficients.from_dict(data["coefficients"])
        data["probes"] = [ProbeResult(**p) for p in data.get("probes", [])]
        return cls(**data, path=path)

    def save(self, path: str | Path | None = None) -> Path:
        """Write the calibration as JSON (default: the per-model, per-machine cache file)."""
        target = Path(path) if path else calibration_path(self.model, self.machine)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2))
        self.path = str(target)
        return target


def calibration_path(model: str, machine: str) -> Path:
    """Cache file of a model's calibration on a machine (`<llmopt cache>/tune/<model>-<machine>.json`)."""
    from llmopt.models import cache_dir

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model.strip("/"))[-80:]
    return cache_dir() / "tune" / f"{safe}-{machine}.json"


def load_calibration(model: str, hardware: Hardware) -> Calibration | None:
    """The cached calibration of `model` on this machine, or None when there is none (or it is unreadable)."""
    path = calibration_path(model, hardware.fingerprint())
    try:
        return Calibration.from_dict(json.loads(path.read_text()), str(path))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def probe_config(base: RunConfig, overrides: list[str], steps: int) -> RunConfig:
    """The base config with a probe's overrides, sized for a short run (no evaluation, enough rows)."""
    data = base.model_dump(mode="json")
    packing = "data.packing=true" in overrides or base.data.packing
    rows = 2000 if packing else 64 * (steps + 2)
    extra = [f"training.max_steps={steps}", "training.warmup_steps=0", "parallelism.num_workers=1"]
    extra.append(f"data.max_train_samples={min(base.data.max_train_samples or rows, rows)}")
    apply_overrides(data, [*overrides, *extra])
    if data["quantization"]["mode"] != "none" and not data["lora"]["enabled"]:
        data["quantization"]["mode"] = "none"
    if data["parallelism"]["zero_stage"] == 3 and data["quantization"]["mode"] != "none":
        data["parallelism"]["zero_stage"] = 2
    return validate_config(data)


def _lstsq(rows: list[list[float]], targets: list[float], floors: list[float]) -> list[float]:
    """Least squares with lower bounds: solve, clamp a violating coefficient at its floor, re-solve."""
    import numpy as np

    fixed: dict[int, float] = {}
    while True:
        free = [j for j in range(len(floors)) if j not in fixed]
        a = np.array([[r[j] for j in free] for r in rows], dtype=float)
        b = np.array(
            [t - sum(r[j] * v for j, v in fixed.items()) for r, t in zip(rows, targets, strict=True)]
        )
        solution = np.linalg.lstsq(a, b, rcond=None)[0] if free else []
        values = dict(fixed)
        values.update({j: float(x) for j, x in zip(free, solution, strict=True)})
        bad = [j for j in free if values[j] < floors[j]]
        if not bad:
            return [values[j] for j in range(len(floors))]
        fixed[bad[0]] = floors[bad[0]]


def _fit(
    model: CostModel, configs: list[RunConfig], measured: list[Measurement], defaults: Coefficients
) -> dict[str, Any]:
    """Fit the cost model's memory and speed constants to the probes.

    Memory: the fixed per-run bytes and the transient-activation scale, by bounded least squares over the
    fp32 probes (see `_fit_memory`).

    Step time, split the way `measure` times it, each part against the terms that drive it:
    - the pass floor (forward + backward of two tokens) against the per-layer overhead units and the
      parameters under ZeRO's gradient hooks, on the reference precision's probes, and each other
      precision's floors as a scale of those (`_fit_floors`);
    - the forward + backward of a micro-batch less its floor against its FLOPs, one rate per precision
      (least squares through the origin): compute no longer shares a fit with fixed costs, which made
      the rate and the overhead trade off against each other from a handful of probes;
    - the optimizer phase against a fixed step cost and the AdamW + ZeRO per-parameter terms, scaled
      together (their ratio stays the default's; the probes cannot separate them).
    A constant the probes do not vary keeps its default.

    Returns:
        The fitted fields of `Coefficients` (`flops_per_s` holds only the measured precisions).
    """
    import numpy as np

    mem_rows, mem_targets, precisions = [], [], []
    floor_rows, floors, opt_rows, opt_targets = [], [], [], []
    compute: dict[str, list[tuple[float, float]]] = {}
    for config, m in zip(configs, measured, strict=True):
        workload = workload_for(config)
        states, host, trainable, total = model.model_states(config)
        acts = model.activation_terms(config, workload)
        known = sum(states.values()) + host + acts["saved"] + acts["recompute"]
        mem_rows.append([1.0, acts["transient_units"]])
        mem_targets.append(m.peak_bytes - m.base_bytes - known)
        terms = model.time_terms(config, workload, trainable, total, int(acts["checkpointed"]))
        precisions.append(terms["precision"])
        accum = terms["accumulation"]
        zero3 = defaults.zero3_layer_overhead_s * terms["zero3_units"]
        floor_rows.append([terms["overhead_units"], terms["grad_params"]])
        floors.append(m.pass_floor_s - zero3)
        per_micro = (m.step_time_s - m.optimizer_time_s - terms["communication"]) / accum
        busy = per_micro - m.pass_floor_s - terms["dequant"] - terms["gather"]
        compute.setdefault(terms["precision"], []).append((terms["flops"] / terms["threads"], busy))
        opt_rows.append([1.0, terms["optimizer"]])
        opt_targets.append(m.optimizer_time_s - terms["offload"])
    fixed, scale = _fit_memory(mem_rows, mem_targets, precisions, defaults)
    layer_s, zero_grad, overhead_scale = _fit_floors(floor_rows, floors, precisions, defaults)
    rates = {}
    for precision, points in compute.items():
        flops, busy = np.array(points).T
        if flops @ busy > 0:  # else the floor took the whole pass: nothing measured of the rate
            rates[precision] = float(flops @ flops / (flops @ busy))
    if _varies([r[1] for r in opt_rows]):
        step_s, factor = _lstsq(opt_rows, opt_targets, [0.0, 0.0])
    else:  # the probes train similar parameter counts: the per-parameter rate keeps its default
        factor = 1.0
        step_s = max(0.0, statistics.mean(t - r[1] for r, t in zip(opt_rows, opt_targets, strict=True)))
    return {
        "fixed_bytes": int(fixed),
        "transient_scale": scale,
        "flops_per_s": rates,
        "layer_overhead_s": layer_s,
        "overhead_scale": overhead_scale,
        "zero_grad_s_per_param": zero_grad,
        "step_overhead_s": step_s,
        "optimizer_s_per_param": defaults.optimizer_s_per_param * factor,
        "zero_step_s_per_param": defaults.zero_step_s_per_param * factor,
    }


def _fit_floors(
    rows: list[list[float]], floors: list[float], precisions: list[str], defaults: Coefficients
) -> tuple[float, float, dict[str, float]]:
    """`(layer overhead, ZeRO hook cost per parameter, overhead scale by precision)` from the pass floors.

    The reference precision's probes (fp32 where two or more ran, else the most probed) fit the per-layer
    and hook costs; every other precision's floors, against what those costs predict for the same
    strategies, give its scale. Fitted together, a CPU's slow 16-bit floors (2.7x fp32's with AVX2 alone)
    raised every fp32 prediction by their share: +40% on the tiny MoE's smallest probe.
    """
    reference = "fp32" if precisions.count("fp32") >= 2 else max(set(precisions), key=precisions.count)
    own = [i for i, p in enumerate(precisions) if p == reference]
    ref_rows, ref_floors = [rows[i] for i in own], [floors[i] for i in own]
    if any(r[1] for r in ref_rows):
        layer_s, zero_grad = _lstsq(ref_rows, ref_floors, [0.0, 0.0])
    else:  # no probe under ZeRO >= 1: its hooks keep their default cost
        zero_grad = defaults.zero_grad_s_per_param
        layer_s = max(0.0, statistics.mean(f / r[0] for r, f in zip(ref_rows, ref_floors, strict=True)))
    overhead_scale = {}
    for precision in sorted(set(precisions) - {reference}):
        mine = [i for i, p in enumerate(precisions) if p == precision]
        expected = sum(layer_s * rows[i][0] for i in mine)
        spent = sum(floors[i] - zero_grad * rows[i][1] for i in mine)
        if expected > 0 and spent > 0:
            overhead_scale[precision] = spent / expected
    return layer_s, zero_grad, overhead_scale


def _varies(values: list[float]) -> bool:
    """Whether probes spread a term enough to fit its coefficient (largest over 1.5x the smallest)."""
    return len(values) >= 2 and max(values) > 1.5 * min(values)


def _fit_memory(rows, targets, precisions, defaults: Coefficients) -> tuple[int, float]:
    """`(fixed bytes, transient scale)` from the probes' own memory: the fp32 probes' where there are
    two or more. A CPU process's first 16-bit steps set up kernels and caches that stay; in the one
    calibration process they count as a bf16 probe's own memory (~50 MiB with the tiny dense preset,
    ~90 MiB with the MoE), while a trial worker's runtime memory already holds them: fitted on the bf16
    probes too, the model over-predicted bf16 trial workers by 12-16%, on the fp32 ones by 3-7%."""
    keep = [i for i, p in enumerate(precisions) if p == "fp32"]
    if len(keep) >= 2:
        rows, targets = [rows[i] for i in keep], [targets[i] for i in keep]
    if _varies([r[1] for r in rows]):
        fixed, scale = _lstsq(rows, targets, [0.0, 0.25])
        return int(fixed), scale
    scale = defaults.transient_scale
    fixed = max(0.0, statistics.mean(t - scale * r[1] for r, t in zip(rows, targets, strict=True)))
    return int(fixed), scale


def _with_fit(defaults: Coefficients, fit: dict[str, Any], runtime: int) -> Coefficients:
    fit = dict(fit)
    rates = fit.pop("flops_per_s")
    flops = dict(defaults.flops_per_s)
    anchor = "fp32" if "fp32" in rates else next(iter(rates), None)
    if anchor:  # unmeasured precisions keep their default speed relative to a measured one
        ratio = rates[anchor] / defaults.flops_per_s[anchor]
        flops = {k: v * ratio for k, v in flops.items()}
    flops.update(rates)
    return replace(defaults, flops_per_s=flops, runtime_bytes=runtime, **fit)


def _in_process_prediction(model: CostModel, config: RunConfig, m: Measurement):
    """Predicted (peak, own bytes, step time, tokens/s) of a probe in this process (its own baseline)."""
    p = model.predict(config, workload_for(config))
    own = p.peak_bytes - p.memory["runtime"]
    return m.base_bytes + own, own, p.step_time_s, p.tokens_per_s


def calibrate(
    config: RunConfig,
    probes: list[tuple[str, list[str]]] | None = None,
    steps: int = 16,
    hardware: Hardware | None = None,
    save: bool = True,
    log=None,
) -> Calibration:
    """Measure probe strategies of `config`'s model in this process and fit the cost model to them.

    Args:
        config: The run whose model, data and resources are profiled.
        probes: `(label, overrides)` strategies to measure (default: `DEFAULT_PROBES`).
        steps: Optimizer steps per probe (the first is not timed; the median of the rest is the figure).
            Step times on a small CPU spread by a tenth or more between steps, and 16-bit steps start slow
            while oneDNN compiles kernels for new shapes: calibrating the tiny MoE, 8 steps gave leave-one-out
            step-time errors of 5-19% (6 calibrations), 16 steps 7-15% (12).
        hardware: This machine (default: detected).
        save: Write the calibration to its cache file.
        log: Optional callable taking a line of progress text.

    Returns:
        The calibration, with every probe's in-sample and leave-one-out errors.
    """
    hardware = hardware or Hardware.detect()
    probes = probes or DEFAULT_PROBES
    name = config.model.name_or_path
    defaults = Coefficients.defaults(hardware)
    configs = [probe_config(config, overrides, steps) for _, overrides in probes]
    # A throwaway step first: one-time costs (imports, DeepSpeed ops, tokenizer and data caches) then
    # sit in every probe's baseline, as they do in a worker's runtime, instead of in the first probe.
    measure(probe_config(config, [*probes[0][1], "training.micro_batch_size=2"], 1), 1, "warm-up")
    measured = []
    for (label, overrides), probe in zip(probes, configs, strict=True):
        m = measure(probe, steps, label, overrides)
        measured.append(m)
        if log:
            log(f"probe {label}: {m.step_time_s * 1000:.0f} ms/step, peak {m.peak_bytes / MIB:.0f} MiB")
    model = CostModel(model_shape(name), hardware, defaults)
    runtime = min(m.base_bytes for m in measured)
    extra = RAY_WORKER_EXTRA_BYTES[hardware.accelerator]
    fitted = CostModel(
        model.shape, hardware, _with_fit(defaults, _fit(model, configs, measured, defaults), runtime)
    )
    results = []
    for i, (config_i, m) in enumerate(zip(configs, measured, strict=True)):
        peak, own, step, tps = _in_process_prediction(fitted, config_i, m)
        result = ProbeResult(
            label=m.label,
            overrides=m.overrides,
            measured_peak_bytes=m.peak_bytes,
            predicted_peak_bytes=int(peak),
            measured_own_bytes=m.peak_bytes - m.base_bytes,
            predicted_own_bytes=int(own),
            measured_step_time_s=m.step_time_s,
            predicted_step_time_s=step,
            measured_tokens_per_s=m.tokens_per_s,
            predicted_tokens_per_s=tps,
            memory_error=(peak - m.peak_bytes) / m.peak_bytes,
            own_memory_error=(own - (m.peak_bytes - m.base_bytes)) / max(1, m.peak_bytes - m.base_bytes),
            step_time_error=(step - m.step_time_s) / m.step_time_s,
        )
        others = [j for j in range(len(measured)) if j != i]
        if len(others) >= 2:
            loo_fit = _fit(model, [configs[j] for j in others], [measured[j] for j in others], defaults)
            loo = CostModel(model.shape, hardware, _with_fit(defaults, loo_fit, runtime))
            peak_loo, _, step_loo, _ = _in_process_prediction(loo, config_i, m)
            result.loo_memory_error = (peak_loo - m.peak_bytes) / m.peak_bytes
            result.loo_step_time_error = (step_loo - m.step_time_s) / m.step_time_s
        results.append(result)
    coefficients = replace(fitted.coefficients, runtime_bytes=runtime + extra)
    calibration = Calibration(
        model=name,
        machine=hardware.fingerprint(),
        hardware=hardware.to_dict(),
        coefficients=coefficients,
        in_process_runtime_bytes=runtime,
        worker_extra_bytes=extra,
        probes=results,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if save:
        calibration.save()
    return calibration


def calibrate_in_subprocess(
    config: RunConfig, hardware: Hardware | None = None, log=None, timeout_s: float = 900.0
) -> Calibration:
    """`calibrate` in a fresh Python process, then the cached result.

    A search driver has Ray, Tune and their threads loaded; measured in it, every probe's base memory
    would carry them (~140 MiB more here) and the model would over-predict a trial worker's peak. A
    fresh interpreter holds what a bare training process holds, as `llmopt recommend --calibrate` does.

    Raises:
        RuntimeError: the calibration process failed (its last output lines are in the message).
    """
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llmopt-calibrate-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config.model_dump(mode="json")))
        process = subprocess.Popen(
            [sys.executable, "-m", "llmopt.tune._calibrate", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore::RuntimeWarning"},
        )
        lines: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip())
            if log and line.startswith("probe "):
                log(line.rstrip())
        code = process.wait(timeout=timeout_s)
    hardware = hardware or Hardware.detect()
    calibration = load_calibration(config.model.name_or_path, hardware) if code == 0 else None
    if calibration is None:
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"cost-model calibration failed (exit {code}):\n{tail}")
    return calibration


if __name__ == "__main__":  # `calibrate_in_subprocess`: python -m llmopt.tune._calibrate CONFIG.json
    import sys

    calibrate(validate_config(json.loads(Path(sys.argv[1]).read_text())), log=print)
