"""`llmopt merge`: an adapter merged into its base gives the same logits as peft's model with the adapter."""

import pytest
import torch

from llmopt.models import MergeError, load_model, merge_adapter


def _adapter(kind: str, path) -> None:
    import peft

    targets = ["q_proj", "v_proj", "down_proj"]
    config = {
        "lora": peft.LoraConfig(r=4, target_modules=targets),
        "dora": peft.LoraConfig(r=4, use_dora=True, target_modules=targets),
        "ia3": peft.IA3Config(target_modules=targets, feedforward_modules=["down_proj"]),
        "loha": peft.LoHaConfig(r=4, target_modules=targets),
        "lokr": peft.LoKrConfig(r=4, target_modules=targets),
        "prompt": peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }[kind]
    torch.manual_seed(0)
    model = peft.get_peft_model(load_model("tiny-llama"), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(path)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "loha", "lokr"])
def test_merged_model_matches_the_adapter(kind, tmp_path):
    from peft import PeftModel

    _adapter(kind, tmp_path / "a")
    target = merge_adapter(tmp_path / "a", tmp_path / "m")
    ids = torch.tensor([[5, 17, 99, 300, 42, 7]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_model("tiny-llama"), str(tmp_path / "a")).eval()(ids).logits
        base = load_model("tiny-llama").eval()(ids).logits
        got = load_model(str(target)).eval()(ids).logits
    assert (want - base).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert (target / "tokenizer.json").is_file() or (target / "tokenizer_config.json").is_file()


def test_prompt_tuning_and_missing_adapters_are_refused(tmp_path):
    _adapter("prompt", tmp_path / "p")
    with pytest.raises(MergeError, match="nothing to merge"):
        merge_adapter(tmp_path / "p")
    with pytest.raises(MergeError, match="holds no adapter"):
        merge_adapter(tmp_path)
