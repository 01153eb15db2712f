"""Magnitude pruning of a causal LM's linear layers through `torch.nn.utils.prune`.

`unstructured` zeroes the smallest-magnitude fraction of each decoder linear layer's weights
(`prune.l1_unstructured`, per layer, as the seed's recipe does). `2:4` keeps the 2 largest of every 4
consecutive weights along a row's inputs, the semi-structured pattern that sparse tensor cores (NVIDIA
Ampere and later, `torch.sparse.to_sparse_semi_structured`) run at twice the dense rate; torch's pruning
module has no N:M method, so it is a `prune.BasePruningMethod` of ours that computes the mask, and torch's
machinery applies and removes it. The embeddings and the output head are left dense. The pruned weights are
stored dense (zeros), so a pruned model loads through `from_pretrained` like any other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import prune

PATTERNS = ("unstructured", "2:4")


class NMPruning(prune.BasePruningMethod):
    """Keep the `n` largest-magnitude weights of every `m` consecutive inputs of each output row."""

    PRUNING_TYPE = "unstructured"  # the mask is elementwise; torch uses this to combine with earlier masks

    def __init__(self, n: int = 2, m: int = 4):
        self.n, self.m = n, m

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        rows, cols = t.shape
        if cols % self.m:
            raise ValueError(f"{self.n}:{self.m} pruning needs in_features divisible by {self.m}, got {cols}")
        groups = t.detach().abs().reshape(rows, cols // self.m, self.m)
        keep = groups.topk(self.n, dim=-1).indices
        mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0).reshape(rows, cols)
        return mask.to(default_mask.dtype) * default_mask

    @classmethod
    def apply(cls, module, name, n: int = 2, m: int = 4):
        return super().apply(module, name, n=n, m=m)


@dataclass
class PruneReport:
    """What was pruned: the pattern, the layers and the measured sparsity of their weights."""

    pattern: str
    sparsity_asked: float
    layers: int
    pruned_weights: int
    total_weights: int

    @property
    def sparsity(self) -> float:
        return self.pruned_weights / max(self.total_weights, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity}


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The decoder's linear layers (the output head and the embeddings stay dense)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    ]


def prune_model(model: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured") -> PruneReport:
    """Prune `model` in place and make the zeros permanent (`prune.remove`: no masks or hooks remain).

    Args:
        model: A causal LM in full precision.
        sparsity: Fraction of each layer's weights to zero (`unstructured`); `2:4` is always 0.5.
        pattern: `unstructured` or `2:4`.

    Raises:
        ValueError: an unknown pattern, a sparsity outside [0, 1), or `2:4` with a sparsity other than 0.5.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pruning pattern {pattern!r} is not one of {', '.join(PATTERNS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1): the fraction of weights to zero")
    if pattern == "2:4" and abs(sparsity - 0.5) > 1e-9:
        raise ValueError(f"2:4 pruning zeroes exactly half the weights; pass sparsity 0.5, not {sparsity}")
    layers = prunable_layers(model)
    pruned = total = 0
    for _, module in layers:
        if pattern == "2:4":
            NMPruning.apply(module, "weight", n=2, m=4)
        else:
            prune.l1_unstructured(module, name="weight", amount=sparsity)
        prune.remove(module, "weight")
        pruned += int((module.weight == 0).sum())
        total += module.weight.numel()
    return PruneReport(pattern, sparsity, len(layers), pruned, total)


def weight_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where each prunable layer's weights are zero (to keep a pruned model's pattern after an update)."""
    return {name: module.weight.detach() == 0 for name, module in prunable_layers(model)}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked weights again (after merging an adapter into a pruned model)."""
    layers = dict(prunable_layers(model))
    with torch.no_grad():
        for name, mask in masks.items():
            layers[name].weight.masked_fill_(mask.to(layers[name].weight.device), 0.0)
