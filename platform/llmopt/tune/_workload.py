"""What a training step computes on: sequence lengths of the encoded training data.

The training loop pads each micro-batch to its longest sequence (`llmopt.data.pad_batch`) and counts
real (unpadded) tokens for tokens/s. So compute and activation memory follow the padded length, which
grows with the micro-batch size, while throughput counts real tokens. With packing every sequence is a
full `max_seq_len` block.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from functools import cache

from llmopt.config import RunConfig


@dataclass(frozen=True)
class Workload:
    """Token lengths of the training sequences, as the training loop sees them.

    Attributes:
        lengths: Sorted distinct lengths.
        counts: How many sequences have each length.
        packed: Sequences are packed `max_seq_len` blocks.
        source: Where the lengths came from (for reports).
    """

    lengths: tuple[int, ...]
    counts: tuple[int, ...]
    packed: bool = False
    source: str = ""

    @classmethod
    def fixed(cls, seq_len: int, source: str = "fixed length") -> Workload:
        """Every sequence exactly `seq_len` tokens, unmasked (no data at hand)."""
        return cls((seq_len,), (1,), packed=False, source=source)

    @classmethod
    def from_lengths(cls, lengths: list[int], packed: bool = False, source: str = "") -> Workload:
        if not lengths:
            raise ValueError("a workload needs at least one sequence length")
        counted = sorted(Counter(lengths).items())
        return cls(tuple(n for n, _ in counted), tuple(c for _, c in counted), packed, source)

    @property
    def masked(self) -> bool:
        """Whether batches carry a non-trivial attention mask (padding, or packed blocks)."""
        return self.packed or len(self.lengths) > 1

    @property
    def longest(self) -> int:
        return self.lengths[-1]

    @property
    def mean_length(self) -> float:
        return sum(n * c for n, c in zip(self.lengths, self.counts, strict=True)) / sum(self.counts)

    def padded_length(self, micro_batch: int) -> float:
        """Expected length a micro-batch is padded to: E[max of `micro_batch` random sequences].

        Exact for draws with replacement from the length distribution: sum over lengths x of
        x * (F(x)^m - F(x-)^m).
        """
        total = sum(self.counts)
        expected, below = 0.0, 0.0
        for length, count in zip(self.lengths, self.counts, strict=True):
            upto = below + count / total
            expected += length * (upto**micro_batch - below**micro_batch)
            below = upto
        return expected

    def quantile(self, q: float) -> int:
        """Length at quantile q (0..1)."""
        total = sum(self.counts)
        cumulative, acc = [], 0
        for c in self.counts:
            acc += c
            cumulative.append(acc / total)
        return self.lengths[min(len(self.lengths) - 1, bisect_right(cumulative, q))]


@cache
def _encoded_lengths(
    dataset: str,
    split: str,
    fmt: str,
    max_rows: int | None,
    template: str,
    max_seq_len: int,
    mask_prompt: bool,
    packing: bool,
    tokenizer_ref: str,
) -> Workload:
    from llmopt.config import ModelConfig
    from llmopt.data import encode_example, load_rows, pack_examples
    from llmopt.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=tokenizer_ref))
    rows = load_rows(dataset, split, fmt, max_rows)
    examples = [encode_example(r, tokenizer, template, max_seq_len, mask_prompt) for r in rows]
    if packing:
        examples = pack_examples(examples, max_seq_len)
    lengths = [len(e["input_ids"]) for e in examples]
    return Workload.from_lengths(
        lengths, packed=packing, source=f"{dataset}/{split} ({len(lengths)} sequences)"
    )


def workload_for(config: RunConfig) -> Workload:
    """Tokenize the config's training split (cached per data settings) and return its lengths.

    Falls back to fixed `model.max_seq_len` sequences when the data or tokenizer cannot be loaded
    (the `source` says so).
    """
    data, model = config.data, config.model
    try:
        return _encoded_lengths(
            data.dataset,
            data.train_split,
            data.format,
            data.max_train_samples,
            data.prompt_template,
            model.max_seq_len,
            data.mask_prompt,
            data.packing,
            model.tokenizer or model.name_or_path,
        )
    except Exception as exc:  # no data here: still predict, at the longest sequences the config allows
        return Workload.fixed(model.max_seq_len, f"max_seq_len (data not loaded: {type(exc).__name__})")
