"""Helpers shared by the tests: tiny Hugging Face models and a snapshot of everything a scan must not change."""

from __future__ import annotations

import dataclasses

import torch


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(config)


def token_batches(count: int = 2, batch: int = 3, length: int = 12, vocab: int = 128, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, length), generator=generator)} for _ in range(count)]


# ---- model state ---------------------------------------------------------------------------


@dataclasses.dataclass
class ModelState:
    tensors: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    parameter_ids: list[int]
    hooks: dict[str, tuple[int, int]]


def snapshot(model: torch.nn.Module) -> ModelState:
    """Everything analysis must leave alone: every state_dict tensor (copied), flags, hooks."""
    return ModelState(
        tensors={k: v.detach().clone() for k, v in model.state_dict().items()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        training={n: m.training for n, m in model.named_modules()},
        parameter_ids=[id(p) for p in model.parameters()],
        hooks={n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
    )


def assert_unchanged(model: torch.nn.Module, before: ModelState) -> None:
    after = snapshot(model)
    assert list(after.tensors) == list(before.tensors), "state_dict keys changed"
    for key, tensor in before.tensors.items():
        now = after.tensors[key]
        assert now.dtype == tensor.dtype and now.shape == tensor.shape, f"{key} changed dtype/shape"
        assert torch.equal(now, tensor), f"{key} changed"
    assert after.requires_grad == before.requires_grad, "requires_grad flags changed"
    assert after.training == before.training, "train/eval mode of some module changed"
    assert after.parameter_ids == before.parameter_ids, "parameters were replaced by new objects"
    assert after.hooks == before.hooks, "hooks were left registered"
    assert all(p.grad is None for p in model.parameters()), "analysis left gradients on the model"


def mixed_mode(model: torch.nn.Module) -> torch.nn.Module:
    """Train mode at the top, eval mode on every other leaf module, and the first parameter frozen."""
    model.train()
    leaves = [m for m in model.modules() if not list(m.children())]
    for module in leaves[1::2]:
        module.eval()
    next(iter(model.parameters())).requires_grad_(False)
    return model
