"""Strategy search: search spaces as data, a calibrated cost model, and pruning/ranking of strategies.

Spaces (`load_space`) map YAML parameters with conditions to RunConfig overrides and to Optuna /
Ray Tune distributions. The cost model (`CostModel.predict`) predicts per-worker peak memory and
tokens/s from the model's shape, the strategy and the hardware; `calibrate` fits its machine constants
to a few real training steps measured in this process (`measure`). `recommend` / `rank` / `prune` drop
the strategies that cannot fit and order the rest, without running anything. `run_search` runs the
search itself (Ray Tune, OptunaSearch + ASHA, each trial a short real fine-tune) against the rule-based
baseline and writes best.yaml, trials.csv/json, pareto.png and summary.json.
"""

from llmopt.config import format_bytes
from llmopt.tune._calibrate import (
    DEFAULT_PROBES,
    Calibration,
    ProbeResult,
    calibrate,
    calibration_path,
    load_calibration,
    probe_config,
)
from llmopt.tune._cost import Coefficients, CostModel, Prediction, checkpointed_layers, resolve_precision_for
from llmopt.tune._gpu_recommend import (
    GpuPlan,
    GpuRecommendation,
    recommend_for_hardware,
    shipped_model_configs,
    strategy_of,
)
from llmopt.tune._hardware import GIB, Hardware, parse_memory
from llmopt.tune._profile import Measurement, measure
from llmopt.tune._rank import (
    COST_PATHS,
    Candidate,
    Ranking,
    baseline_config,
    default_space_path,
    describe,
    prune,
    rank,
    recommend,
    space_candidates,
)
from llmopt.tune._report import SearchResult, pareto_front, plot_pareto, results_table, write_outputs
from llmopt.tune._search import (
    SearchSettings,
    feasibility,
    run_search,
    run_trial,
    score,
    trial_config,
)
from llmopt.tune._shape import LoraCount, ModelShape, model_shape
from llmopt.tune._space import Condition, Parameter, SearchSpace, load_space, space_facts
from llmopt.tune._workload import Workload, workload_for

__all__ = [
    "COST_PATHS",
    "DEFAULT_PROBES",
    "GIB",
    "Calibration",
    "Candidate",
    "Coefficients",
    "Condition",
    "CostModel",
    "GpuPlan",
    "GpuRecommendation",
    "Hardware",
    "LoraCount",
    "Measurement",
    "ModelShape",
    "Parameter",
    "Prediction",
    "ProbeResult",
    "Ranking",
    "SearchResult",
    "SearchSettings",
    "SearchSpace",
    "Workload",
    "baseline_config",
    "calibrate",
    "calibration_path",
    "checkpointed_layers",
    "default_space_path",
    "describe",
    "feasibility",
    "format_bytes",
    "load_calibration",
    "load_space",
    "measure",
    "model_shape",
    "pareto_front",
    "parse_memory",
    "plot_pareto",
    "probe_config",
    "prune",
    "rank",
    "recommend",
    "recommend_for_hardware",
    "resolve_precision_for",
    "results_table",
    "run_search",
    "run_trial",
    "score",
    "shipped_model_configs",
    "space_candidates",
    "space_facts",
    "strategy_of",
    "trial_config",
    "workload_for",
    "write_outputs",
]
