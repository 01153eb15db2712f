"""The LLM Serve application: an HTTP ingress in front of autoscaled model replicas.

Run it with any of::

    serve run serve_apps.llm:app config=jobs/configs/tiny-llama-reverse.yaml serving.batching.max_batch_size=8
    serve deploy serve_apps/configs/llm.yaml          # a running cluster started with PYTHONPATH=<repo>
    llmopt serve --config jobs/configs/tiny-llama-reverse.yaml

Deployments (``serving.layout=split``): ``LLMIngress`` (``serve_apps/_ingress.py``: validation, API keys,
tokenization, the OpenAI and seed APIs, metrics; errors in ``serve_apps/_errors.py``) and ``LLMServer``
(``serve_apps/_server.py``: the model, the continuous-batching engine and session KV caches; the one that
autoscales). With ``serving.layout=single`` (what ``auto`` picks for one model on one replica) there is one
deployment, named ``LLMServer``: each replica is the ingress and runs the model in its own process
(``serve_apps/_local.py``). Both layouts are sized by ``llmopt.deployment.deployment_options``, which the
KubeRay RayService renderer uses too.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(OpenAI-compatible, ``stream: true`` as server-sent events, ``session_id`` extension), the seed API
``POST /api/v1/model/generate`` (chunked text stream or JSON, ``X-Session-ID``) and
``POST /api/v1/model/batch-generate``, and ``GET /api/v1/stats`` (one replica's device, memory, engine and
cache counters). Errors use OpenAI's body shape; overload is HTTP 503 with ``Retry-After``.
"""

from typing import Any

import ray
from ray.serve import Application

from llmopt.cluster import check_resources
from llmopt.config import load_config
from llmopt.deployment import INGRESS, SERVER, deployment_args, deployment_options, model_deployment_args
from llmopt.serve import check_models, check_native_setup, check_vllm_setup
from serve_apps._ingress import LLMIngress
from serve_apps._local import LocalServer
from serve_apps._server import LLMServer

__all__ = ["LLMIngress", "LLMServer", "app"]


def app(args: dict[str, Any]) -> Application:
    """Build the Serve application from ``serve run`` / ``serve deploy`` arguments.

    Args:
        args: ``config`` (a YAML path, optional), ``overrides`` (a list of ``a.b=value`` strings, optional)
            and any other ``a.b=value`` pair that ``serve run ... a.b=value`` passes as a key.

    Returns:
        The ingress bound to the ``LLMServer`` deployment, both sized from ``config.serving`` and
        ``config.resources``.
    """
    args = dict(args)
    path = args.pop("config", None)
    overrides = list(args.pop("overrides", None) or [])
    overrides += [f"{key}={value}" for key, value in args.items()]
    config = load_config(path, overrides)
    check_vllm_setup(config)  # serving.engine=vllm: what vLLM does not do fails here, before any replica
    check_native_setup(config)  # adapters the native engine cannot serve, likewise
    if ray.is_initialized():  # `llmopt serve` and `serve deploy`: fail now, not wait for GPUs no node has
        check_resources(config, "serving")
    check_models(config)  # serving.models: each loads and shares the main model's tokenizer
    options, data = deployment_options(config), deployment_args(config)
    if config.serving.single_layout:
        # One deployment named for the model it runs (its replicas autoscale, take the batch settings as
        # user_config and are what the alert rules count), serving HTTP from the same process.
        local = LocalServer(data[SERVER])
        return LLMIngress.options(name=SERVER, **options[SERVER]).bind(local, data[INGRESS])
    server = LLMServer.options(**options[SERVER]).bind(data[SERVER])
    models = {
        name: LLMServer.options(**options[SERVER], name=deployment).bind(args)
        for name, (deployment, args) in model_deployment_args(config).items()
    }
    return LLMIngress.options(**options[INGRESS]).bind(server, data[INGRESS], models)
