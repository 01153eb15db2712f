"""`LLMServer.reconfigure`: the user_config of a Serve config or a rendered RayService, applied or refused
with an error that names what is wrong (once a null batch_wait_timeout_s crashed it in `float(None)`)."""

import math

import pytest

from llmopt.config import load_config
from serve_apps._server import LLMServer, batch_settings


class _Replica:
    """What `reconfigure` needs of a replica: its run config, and where the settings go."""

    def __init__(self, overrides: list[str]) -> None:
        self.config = load_config(None, overrides)
        self.applied: tuple[int, float] | None = None
        self.controller = None  # monitor.adaptive_batching off
        self.vllm = None  # the native engine

    def _set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.applied = (max_batch_size, batch_wait_timeout_s)


@pytest.mark.parametrize(
    ("overrides", "user_config", "applied"),
    [
        ([], {"max_batch_size": 3, "batch_wait_timeout_s": 0.005}, (3, 0.005)),
        ([], {}, (8, 0.0)),
        # null (or a key left out) keeps the run config's value; the wait, the batching mode's default
        (["serving.batching.mode=static"], {"max_batch_size": 4, "batch_wait_timeout_s": None}, (4, 0.01)),
        (["serving.batching.batch_wait_timeout_s=0.2"], {"max_batch_size": None}, (8, 0.2)),
        ([], {"max_batch_size": 16.0}, (16, 0.0)),  # a whole number written as a float
    ],
)
def test_reconfigure_applies_the_user_config(overrides, user_config, applied):
    replica = _Replica(overrides)
    LLMServer.func_or_class.reconfigure(replica, user_config)
    assert replica.applied == applied
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in replica.applied)


def test_reconfigure_restarts_adaptive_batching_from_the_operators_size():
    from llmopt.monitor import BatchSizeController

    replica = _Replica(["monitor.adaptive_batching=true", "serving.batching.max_batch_size=32"])
    monitor = replica.config.monitor
    replica.controller = BatchSizeController(
        monitor.adaptive_batching, monitor.tpot_slo_s, monitor.slo_percentile, size=32, upper=32
    )
    LLMServer.func_or_class.reconfigure(replica, {"max_batch_size": 12})
    assert replica.applied == (12, 0.0)
    assert (replica.controller.size, replica.controller.upper) == (12, 12)


@pytest.mark.parametrize(
    ("user_config", "names"),
    [
        ([8, 0.0], ["must be a mapping", "list"]),
        ("max_batch_size=8", ["must be a mapping", "str"]),
        ({"max_batch": 8}, ["unknown keys ['max_batch']", "max_batch_size"]),
        ({"mode": "static"}, ["unknown keys ['mode']"]),  # a batching field, but not one changed at runtime
        ({"max_batch_size": True}, ["max_batch_size=True: not a number"]),
        ({"max_batch_size": "eight"}, ["max_batch_size='eight'", "valid integer"]),
        ({"max_batch_size": 2.5}, ["max_batch_size=2.5", "fractional part"]),
        ({"max_batch_size": 0}, ["max_batch_size=0", "greater than or equal to 1"]),
        ({"batch_wait_timeout_s": -1}, ["batch_wait_timeout_s=-1", "greater than or equal to 0"]),
        ({"batch_wait_timeout_s": float("nan")}, ["batch_wait_timeout_s=nan"]),
        ({"batch_wait_timeout_s": "soon"}, ["batch_wait_timeout_s='soon'", "valid number"]),
    ],
)
def test_a_bad_user_config_is_refused_with_what_is_wrong(user_config, names):
    replica = _Replica([])
    with pytest.raises(ValueError, match="LLMServer user_config") as caught:
        LLMServer.func_or_class.reconfigure(replica, user_config)
    message = str(caught.value)
    for name in names:
        assert name in message, message
    assert "accepted: max_batch_size" in message
    assert replica.applied is None  # nothing half-applied


def test_batch_settings_and_the_run_config_agree_on_the_bounds():
    """The runtime check is the run config's own (`serving.batching`): what one accepts, so does the other."""
    batching = load_config(None).serving.batching
    assert batch_settings({"max_batch_size": 1024, "batch_wait_timeout_s": 10}, batching) == (1024, 10.0)
    with pytest.raises(ValueError, match="max_batch_size=1025"):
        batch_settings({"max_batch_size": 1025}, batching)
    with pytest.raises(ValueError, match=r"batch_wait_timeout_s=10\.5"):
        batch_settings({"batch_wait_timeout_s": 10.5}, batching)


def test_a_vllm_replica_checks_the_user_config_and_says_a_new_size_needs_a_redeploy(caplog):
    replica = _Replica(["serving.batching.max_batch_size=8"])
    replica.vllm, replica.max_batch_size = object(), 8  # vLLM's max_num_seqs is fixed at its start
    with caplog.at_level("WARNING", logger="ray.serve"):
        LLMServer.func_or_class.reconfigure(replica, {"max_batch_size": 8, "batch_wait_timeout_s": None})
        assert not caplog.records
        LLMServer.func_or_class.reconfigure(replica, {"max_batch_size": 16})
    assert replica.applied is None
    assert "not applied" in caplog.text and "serving.batching.max_batch_size=16" in caplog.text
    with pytest.raises(ValueError, match="unknown keys"):
        LLMServer.func_or_class.reconfigure(replica, {"max_batch": 16})
