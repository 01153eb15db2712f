"""Magnitude pruning (unstructured and 2:4) of the decoder's linear layers; the pruned model saves and loads
like any model."""

import pytest
import torch

from llmopt.config import load_config
from llmopt.models import apply_masks, load_model, prune_model, weight_masks
from llmopt.train import prune_to_directory


def test_unstructured_zeroes_the_smallest_weights_of_each_layer_and_leaves_the_head_dense():
    model = load_model("tiny-llama")
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    report = prune_model(model, 0.5)
    after = model.model.layers[0].mlp.down_proj.weight
    assert report.layers == 28 and report.sparsity == pytest.approx(0.5, abs=1e-3)
    kept = after != 0
    assert before.abs()[kept].min() >= before.abs()[~kept].max()  # magnitude: every kept >= every dropped
    assert torch.equal(model.lm_head.weight, head)
    assert not any(name.endswith("weight_mask") for name, _ in model.named_buffers())
    assert not any(name.endswith("weight_orig") for name, _ in model.named_parameters())  # prune.remove ran


def test_two_of_four_keeps_the_two_largest_of_every_four_inputs():
    model = load_model("tiny-llama")
    q = model.model.layers[1].self_attn.q_proj
    before = q.weight.detach().clone()
    prune_model(model, 0.5, "2:4")
    groups = q.weight.reshape(q.weight.shape[0], -1, 4)
    assert torch.all((groups != 0).sum(-1) == 2)
    want = before.abs().reshape_as(groups).topk(2, dim=-1).indices.sort(-1).values
    got = (groups != 0).nonzero()[:, -1].reshape(*groups.shape[:2], 2)
    assert torch.equal(got, want)


def test_bad_arguments_and_masks_survive_an_update(tmp_path):
    model = load_model("tiny-llama")
    for sparsity, pattern, message in ((1.0, "unstructured", "must be in"), (0.3, "2:4", "exactly half"),
                                       (0.5, "4:8", "not one of")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            prune_model(model, sparsity, pattern)
    prune_model(model, 0.6)
    masks = weight_masks(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # a merged adapter's update touches every weight
    apply_masks(model, masks)
    assert all(torch.all(dict(model.named_modules())[name].weight[mask] == 0) for name, mask in masks.items())


def test_prune_to_directory_writes_a_loadable_model(tmp_path):
    config = load_config(None, ["model.name_or_path=tiny-llama", f"output_dir={tmp_path}", "name=p"])
    target, report = prune_to_directory(config, 0.5)
    assert target == tmp_path / "p-pruned50" and report["recovery"] is None
    reloaded = load_model(str(target))
    zeros = sum(int((m.weight == 0).sum()) for _, m in _linears(reloaded))
    assert zeros == report["pruned_weights"] and (target / "prune.json").is_file()
    assert (target / "tokenizer.json").is_file()


def _linears(model):
    from llmopt.models._prune import prunable_layers

    return prunable_layers(model)


def test_cli_prunes_and_names_bad_options(tmp_path):
    import subprocess

    ok = subprocess.run(
        ["llmopt", "prune", "model.name_or_path=tiny-llama", "--pattern", "2:4", "-o", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "50.0% of their weights are zero (2:4)" in ok.stdout and (tmp_path / "m" / "config.json").is_file()
    bad = subprocess.run(
        ["llmopt", "prune", "--sparsity", "0.3", "--pattern", "2:4", "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "pass sparsity 0.5" in bad.stdout + bad.stderr
