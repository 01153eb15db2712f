"""A byte-level BPE tokenizer trained locally on text shipped in the repo.

Digits are split one per token (as Llama's tokenizer does), so digit tasks have a clean token-level
structure. The result is a `PreTrainedTokenizerFast` with BOS/EOS/PAD and a chat template, saved with
`save_pretrained` and always used through `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmopt.data import BUILTIN_DIR, builtin_datasets, load_rows

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"


def training_texts() -> list[str]:
    """The shipped corpus plus every built-in training row rendered with the default template."""
    texts = (BUILTIN_DIR / "corpus.txt").read_text(encoding="utf-8").split("\n\n")
    for name in builtin_datasets():
        for row in load_rows(name, "train"):
            texts.append(DEFAULT_PROMPT_TEMPLATE.replace("{prompt}", row["prompt"]) + row["response"])
    return texts


def train_tokenizer(vocab_size: int, out_dir: str | Path):
    """Train the byte-level BPE tokenizer and save it as a PreTrainedTokenizerFast in `out_dir`.

    Args:
        vocab_size: Target vocabulary size, special tokens included.
        out_dir: Directory to `save_pretrained` into.

    Returns:
        The tokenizer, reloaded from `out_dir` through `AutoTokenizer.from_pretrained`.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="right",
    )
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
