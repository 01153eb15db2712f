"""MoE grouped products on CPU in 16-bit pad each expert's rows (llmopt.models._experts): exact, and on."""

import pytest
import torch
from transformers.integrations import moe

from llmopt.config import load_config
from llmopt.models import apply_strategy, load_for_training
from llmopt.models._experts import granule, grouped_product, pad_expert_groups, padded_grouped_mm


def _grouped(sizes, k=24, n=40, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), k, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(len(sizes), k, n, generator=generator).to(dtype).requires_grad_()
    offs = torch.cumsum(torch.tensor(sizes), 0).to(torch.int32)
    return x, weight, offs


def _unpadded():
    pad_expert_groups()
    return moe._grouped_mm.__wrapped__


def test_the_granule_is_a_power_of_two_up_to_a_quarter_of_the_mean_group():
    assert granule(1024, 4) == 32  # mean 256: capped at 32
    assert granule(256, 4) == 16  # mean 64: a quarter is 16
    assert granule(200, 4) == 8  # mean 50: 12.5 rounds down to 8
    assert granule(32, 4) == 2
    assert granule(16, 4) == 1  # mean 4: too small to pad
    assert granule(0, 4) == 1


@pytest.mark.parametrize("sizes", [[5, 0, 17, 33], [0, 0, 9, 0], [64, 64, 64, 64], [1, 2, 3, 100]])
def test_padding_changes_neither_the_product_nor_its_gradients(sizes):
    original = _unpadded()
    x, weight, offs = _grouped(sizes)
    out = original(x, weight, offs=offs)
    out.backward(torch.ones_like(out))
    expected = (out.detach(), x.grad.clone(), weight.grad.clone())
    x.grad, weight.grad = None, None
    padded = padded_grouped_mm(original, x, weight, offs, 16)
    padded.backward(torch.ones_like(padded))
    for got, want in zip((padded.detach(), x.grad, weight.grad), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _sizes(offs):
    ends = offs.to(torch.int64)
    return torch.diff(ends, prepend=ends.new_zeros(1)).tolist()


def test_16bit_cpu_products_reach_the_kernel_padded_and_others_do_not():
    original, seen = _unpadded(), []

    def spy(x, weight, offs):
        seen.append(_sizes(offs))
        return original(x, weight, offs=offs)

    sizes = [70, 3, 130, 53]  # 256 rows over 4 experts: granule 16
    x, weight, offs = _grouped(sizes, dtype=torch.bfloat16)
    padded = grouped_product(spy, x, weight, offs)
    x32, weight32, offs32 = _grouped(sizes)
    grouped_product(spy, x32, weight32, offs32)
    small = _grouped([3, 1, 0, 4], dtype=torch.bfloat16)
    grouped_product(spy, *small)
    assert seen == [[80, 16, 144, 64], sizes, [3, 1, 0, 4]]
    torch.testing.assert_close(padded, original(x, weight, offs=offs))


@pytest.fixture
def kernel_groups(monkeypatch):
    """Row counts per expert of every grouped product torch runs (all of transformers' grouped paths)."""
    seen = []
    for owner, name in ((torch.nn.functional, "grouped_mm"), (torch, "_grouped_mm")):
        real = getattr(owner, name)

        def recording(*args, _real=real, **kwargs):
            seen.append(_sizes(kwargs["offs"]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, recording)
    return seen


def _moe_step(dtype):
    """Loss and adapter gradients of one LoRA-on-experts step of the tiny MoE in `dtype`."""
    config = load_config("jobs/configs/tiny-moe-reverse.yaml", ["lora.dropout=0"])
    model, _ = apply_strategy(load_for_training(config, "fp32", "cpu", training_dtype="bf16"), config)
    model = model.to(dtype)
    ids = torch.randint(3, 200, (8, 64), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad and "experts" in n}
    return loss.detach().float(), grads


def test_a_bf16_moe_training_step_runs_padded_and_matches_the_unpadded_step(kernel_groups, monkeypatch):
    original = _unpadded()
    monkeypatch.setattr(moe, "_grouped_mm", original)  # as transformers ships it
    torch.manual_seed(0)
    loss, grads = _moe_step(torch.bfloat16)
    assert moe._grouped_mm.__wrapped__ is original  # load_for_training installed the padding
    assert grads, "the adapters on the experts train"
    # 8 x 64 tokens, top-2 of 4 experts: 256 rows an expert on average, padded to multiples of 32.
    assert kernel_groups and all(size % 32 == 0 for sizes in kernel_groups for size in sizes), kernel_groups
    padded_shapes = {tuple(sizes) for sizes in kernel_groups}
    kernel_groups.clear()
    monkeypatch.setattr(moe, "_grouped_mm", original)
    monkeypatch.setattr("llmopt.models._strategy.pad_expert_groups", lambda: False)
    torch.manual_seed(0)
    plain_loss, plain_grads = _moe_step(torch.bfloat16)
    assert any(size % 32 for sizes in kernel_groups for size in sizes)
    assert len(padded_shapes) <= len({tuple(sizes) for sizes in kernel_groups})
    torch.testing.assert_close(loss, plain_loss, rtol=1e-2, atol=1e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=5e-2, atol=5e-3, msg=name)


def test_fp32_training_keeps_transformers_product(kernel_groups):
    _moe_step(torch.float32)
    assert any(size % 32 for sizes in kernel_groups for size in sizes)


@pytest.mark.parametrize(
    "overrides",
    [[], ["moe.adapter_targets=[attention]"], ["lora.enabled=false"]],
    ids=["lora-experts", "lora-attention", "full"],
)
def test_padding_keeps_no_more_for_backward_than_the_unpadded_product(monkeypatch, overrides):
    """The cost model's activation counts hold in padded training: autograd keeps the same bytes (frozen
    experts keep no input, adapted or trained ones their input and weight)."""
    from llmopt.models import load_model
    from llmopt.train._checkpointing import measure_layer_activations

    config = load_config("jobs/configs/tiny-moe-reverse.yaml", overrides)
    ids = torch.randint(5, 200, (8, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    original, saved = _unpadded(), {}
    for name, product in (("padded", moe._grouped_mm), ("unpadded", original)):
        monkeypatch.setattr(moe, "_grouped_mm", product)
        model, _ = apply_strategy(load_model("tiny-moe"), config)
        saved[name] = measure_layer_activations(model.to(torch.bfloat16).train(), batch)
    assert saved["padded"] == saved["unpadded"]
