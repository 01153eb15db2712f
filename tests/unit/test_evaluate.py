"""The evaluator: an untrained model scores 0; a model that memorised the rows scores 1."""

import math

import torch

from llmopt.data import encode_example, evaluate, load_rows, pad_batch
from llmopt.models import load_model, load_tokenizer

TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"


def test_untrained_model_scores_zero_with_near_uniform_loss():
    model, tokenizer = load_model("tiny-llama"), load_tokenizer("tiny-llama")
    rows = load_rows("reverse", "test", limit=32)
    result = evaluate(model, tokenizer, rows, TEMPLATE, max_length=64)
    assert result.exact_match == 0.0 and result.num_examples == 32
    assert abs(result.loss - math.log(model.config.vocab_size)) < 0.5
    assert len(result.samples) == 5 and result.samples[0]["expected"] == rows[0]["response"]


def test_memorised_rows_score_one_and_loss_drops():
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny-llama"), load_tokenizer("tiny-llama")
    rows = load_rows("reverse", "train", limit=4)
    batch = pad_batch([encode_example(r, tokenizer, TEMPLATE, 64) for r in rows], tokenizer.pad_token_id)
    before = evaluate(model, tokenizer, rows, TEMPLATE, max_length=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(50):
        loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluate(model, tokenizer, rows, TEMPLATE, max_length=64)
    assert model.training  # evaluate restores the mode it found
    assert before.exact_match == 0.0
    assert after.exact_match == 1.0, after.samples
    assert after.loss < 0.1 < before.loss


def test_torch_threads_follow_the_cpu_share_rounded_to_whole_cpus():
    """A replica of 1.9 CPUs beside a 0.1-CPU ingress on a 2-core machine gets 2 threads; a fraction, 1."""
    from llmopt.runtime import set_torch_threads

    before = torch.get_num_threads()
    try:
        assert [set_torch_threads(c) for c in (0.5, 1.0, 1.4, 1.9, 3.2)] == [1, 1, 1, 2, 3]
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
