"""Traffic splits (`serving.routes`): a model name clients call, served by arms in proportion to weights.

A caller's arm is a pure function of the route's weights and a sticky id (the OpenAI `user`, the session id
or the API key's digest): the id hashes to a point in [0, 1), and the arms own consecutive intervals of it
in name order, each as wide as its share. So a caller stays on its arm while the weights stay, and a change
of weights moves only the callers in the intervals that changed hands (promoting a 10% canary to 50% moves
40% of callers, all onto the canary). The weights are the ingress deployment's `user_config`: changing them
reconfigures the live ingress, without a restart and without dropping a request.

Ray- and torch-free.
"""

from __future__ import annotations

import hashlib
import statistics
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from llmopt.config import RouteConfig


class RouteWeightsError(ValueError):
    """A `user_config` whose route weights cannot be applied (the message names the field and the fix)."""


@dataclass
class ArmStats:
    """What one arm has served, for `/api/v1/routes`."""

    requests: int = 0
    errors: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=4096))
    evaluation: dict[str, Any] | None = None

    def record(self, seconds: float, ok: bool) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        if ok:
            self.latencies.append(seconds)

    def to_dict(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] if ordered else None
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "latency_p50_s": statistics.median(ordered) if ordered else None,
            "latency_p99_s": p99,
            "evaluation": self.evaluation,
        }


class Router:
    """The routes of `serving.routes`, their live weights and per-arm counters."""

    def __init__(self, routes: dict[str, RouteConfig]):
        self.routes = routes
        self.weights = {
            name: {a: arm.weight for a, arm in route.arms.items()} for name, route in routes.items()
        }
        self.stats = {name: {a: ArmStats() for a in route.arms} for name, route in routes.items()}
        self.changed_at = time.time()

    def __contains__(self, name: object) -> bool:
        return name in self.routes

    @staticmethod
    def user_config(routes: dict[str, RouteConfig]) -> dict[str, Any]:
        """The ingress's `user_config` holding the routes' weights."""
        return {"routes": {n: {a: arm.weight for a, arm in r.arms.items()} for n, r in routes.items()}}

    def set_weights(self, user_config: dict[str, Any]) -> bool:
        """Apply `{"routes": {route: {arm: weight}}}` (every route and arm as configured); True if changed.

        Raises:
            RouteWeightsError: unknown or missing routes or arms, negative weights, or all of a route's 0.
        """
        given = (user_config or {}).get("routes", {})
        if not isinstance(given, dict) or set(given) != set(self.routes):
            raise RouteWeightsError(
                f"user_config routes {sorted(given) if isinstance(given, dict) else given!r} must name every "
                f"route of serving.routes, {sorted(self.routes)}; arms and routes change with a redeploy"
            )
        new = {}
        for name, arms in given.items():
            known = set(self.routes[name].arms)
            if not isinstance(arms, dict) or set(arms) != known:
                raise RouteWeightsError(
                    f"user_config routes.{name} must give a weight to each of its arms {sorted(known)}"
                )
            weights = {}
            for arm, weight in arms.items():
                if not isinstance(weight, int | float) or isinstance(weight, bool) or weight < 0:
                    raise RouteWeightsError(f"user_config routes.{name}.{arm}={weight!r}: use a number >= 0")
                weights[arm] = float(weight)
            if sum(weights.values()) <= 0:
                raise RouteWeightsError(f"user_config routes.{name}: every weight is 0; give one arm a share")
            new[name] = weights
        changed = new != self.weights
        self.weights = new  # one assignment: a request sees the old weights or the new ones, never a mix
        if changed:
            self.changed_at = time.time()
        return changed

    def pick(self, route: str, user: str | None, session: str | None, owner: str | None) -> tuple[str, str]:
        """(arm, served model) for a request to `route`; `owner` is None for a caller without an API key.

        A request with nothing to stick to (no user, session or key) is drawn on its own: with keys off,
        every caller shares one anonymous owner, which would send all of them to one arm.
        """
        config = self.routes[route]
        sticky = {
            "auto": user or session or owner,
            "user": user or owner,
            "session": session or owner,
            "key": owner,
            "none": None,
        }[config.sticky] or uuid.uuid4().hex
        point = int.from_bytes(hashlib.sha256(f"{route}\0{sticky}".encode()).digest()[:8], "big") / 2**64
        weights = self.weights[route]
        total = sum(weights.values())
        edge = 0.0
        chosen = None
        for arm in sorted(weights):
            if weights[arm] <= 0:
                continue
            chosen = arm
            edge += weights[arm] / total
            if point < edge:
                break
        return chosen, config.arms[chosen].model

    def describe(self) -> dict[str, Any]:
        """Weights, shares and per-arm counters of every route."""
        out = {}
        for name, route in self.routes.items():
            weights = self.weights[name]
            total = sum(weights.values())
            out[name] = {
                "sticky": route.sticky,
                "weights_changed_at": self.changed_at,
                "arms": {
                    arm: {
                        "model": spec.model,
                        "weight": weights[arm],
                        "share": weights[arm] / total,
                        **self.stats[name][arm].to_dict(),
                    }
                    for arm, spec in route.arms.items()
                },
            }
        return out
