"""Traffic splits: weighted, sticky arms; weights changed at runtime move only the callers they must."""

import pytest

from llmopt.config import ConfigError, load_config
from llmopt.deployment import INGRESS, SERVER, deployment_args, deployment_options
from llmopt.serve import Router, RouteWeightsError

SPLIT = [
    "serving.adapters.v2=/nowhere/v2",
    "serving.routes.assistant.arms.stable.model=tiny-llama",
    "serving.routes.assistant.arms.stable.weight=90",
    "serving.routes.assistant.arms.canary.model=tiny-llama:v2",
    "serving.routes.assistant.arms.canary.weight=10",
]


def _router(*extra):
    return Router(load_config(None, [*SPLIT, *extra]).serving.routes)


def test_the_split_follows_the_weights_and_sticks_per_caller():
    router = _router()
    arms = [router.pick("assistant", f"user-{i}", None, "owner")[0] for i in range(4000)]
    assert arms.count("canary") / len(arms) == pytest.approx(0.10, abs=0.02)
    assert router.pick("assistant", "user-7", None, "o") == router.pick("assistant", "user-7", "s", "x")
    assert router.pick("assistant", None, None, "key-a") == router.pick("assistant", None, None, "key-a")
    assert router.pick("assistant", "u", None, "o")[1] in ("tiny-llama", "tiny-llama:v2")


def test_new_weights_move_only_the_callers_whose_interval_changed_hands():
    router = _router()
    users = [f"user-{i}" for i in range(10000)]
    before = {u: router.pick("assistant", u, None, "o")[0] for u in users}
    assert router.set_weights({"routes": {"assistant": {"stable": 50, "canary": 50}}})
    after = {u: router.pick("assistant", u, None, "o")[0] for u in users}
    assert all(after[u] == "canary" for u in users if before[u] == "canary")  # a canary user stays
    assert sum(a == "canary" for a in after.values()) / len(users) == pytest.approx(0.5, abs=0.04)
    assert not router.set_weights({"routes": {"assistant": {"stable": 50, "canary": 50}}})  # no change
    router.set_weights({"routes": {"assistant": {"stable": 1, "canary": 0}}})  # rollback
    assert {router.pick("assistant", u, None, "o")[0] for u in users} == {"stable"}
    shares = router.describe()["assistant"]["arms"]
    assert (shares["stable"]["share"], shares["canary"]["share"]) == (1.0, 0.0)


def test_bad_weights_and_bad_routes_name_the_fix():
    router = _router()
    for bad, message in (
        ({"routes": {"other": {"a": 1}}}, "must name every route"),
        ({"routes": {"assistant": {"stable": 1}}}, "each of its arms"),
        ({"routes": {"assistant": {"stable": -1, "canary": 1}}}, "a number >= 0"),
        ({"routes": {"assistant": {"stable": 0, "canary": 0}}}, "every weight is 0"),
    ):
        with pytest.raises(RouteWeightsError, match=message):
            router.set_weights(bad)
    assert router.weights == {"assistant": {"stable": 90.0, "canary": 10.0}}  # unchanged
    with pytest.raises(ConfigError, match="is not served here"):
        load_config(None, [*SPLIT[1:], "serving.routes.assistant.arms.canary.model=v3"])
    with pytest.raises(ConfigError, match="already a served model name"):
        load_config(
            None,
            [
                "serving.routes.tiny-llama.arms.a.model=tiny-llama",
                "serving.routes.tiny-llama.arms.a.weight=1",
            ],
        )
    with pytest.raises(ConfigError, match="every arm of the route has weight 0"):
        load_config(None, [*SPLIT[:3], "serving.routes.assistant.arms.stable.weight=0", *SPLIT[3:4],
                           "serving.routes.assistant.arms.canary.weight=0"])  # fmt: skip


def test_weights_reach_the_ingress_as_user_config_and_no_constructor():
    config = load_config(None, SPLIT)
    options, args = deployment_options(config), deployment_args(config)
    assert options[INGRESS]["user_config"] == {"routes": {"assistant": {"stable": 90.0, "canary": 10.0}}}
    assert args[SERVER]["serving"]["routes"] == {}  # model replicas never restart for a weight change
    other = deployment_args(load_config(None, [*SPLIT, "serving.routes.assistant.arms.canary.weight=50"]))
    assert other == args  # constructor arguments equal: Serve reconfigures the live ingress


def test_more_models_get_their_own_deployments_and_may_be_arms(tmp_path):
    from llmopt.deployment import model_deployment_args
    from llmopt.models import load_model, load_tokenizer
    from llmopt.serve import ServingSetupError, check_models

    config = load_config(None, ["serving.models.v3=tiny-moe", "serving.routes.r.arms.a.model=v3",
                                "serving.routes.r.arms.a.weight=1"])  # fmt: skip
    ((name, args),) = model_deployment_args(config).values()
    assert name == "LLMServer-v3" and args["model"]["name_or_path"] == "tiny-moe"
    assert args["serving"]["adapters"] == {} and args["serving"]["routes"] == {}
    assert deployment_args(config)[SERVER]["serving"]["models"] == {}  # the main replica never sees them
    check_models(config)  # the presets share one tokenizer
    for bad, message in (("serving.models.tiny-llama=tiny-moe", "already a served model name"),
                         ("serving.models.a/b=tiny-moe", "letters, digits")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])
    other = tmp_path / "other"
    load_model("tiny-llama").save_pretrained(other)
    tokenizer = load_tokenizer("tiny-llama")
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ServingSetupError, match="has another tokenizer"):
        check_models(load_config(None, [f"serving.models.x={other}"]))


def test_a_caller_with_nothing_to_stick_to_is_drawn_per_request():
    router = _router()
    arms = [router.pick("assistant", None, None, None)[0] for _ in range(4000)]
    assert arms.count("canary") / len(arms) == pytest.approx(0.10, abs=0.02)
