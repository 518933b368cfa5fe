"""The local tiny MoE generator: deterministic, loadable by transformers."""

from __future__ import annotations

import hashlib

import pytest
import torch

from vllm_a2a_plugin.testing.tiny_moe import TinyMoESpec, make_tiny_moe, tensor_shapes


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = make_tiny_moe(tmp_path / "a", TinyMoESpec(seed=3))
    b = make_tiny_moe(tmp_path / "b", TinyMoESpec(seed=3))
    c = make_tiny_moe(tmp_path / "c", TinyMoESpec(seed=4))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert digest(a / name) == digest(b / name)
    assert digest(a / "model.safetensors") != digest(c / "model.safetensors")


def test_checkpoint_matches_the_architecture(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    spec = TinyMoESpec(num_experts=16, top_k=4)
    path = make_tiny_moe(tmp_path / "m", spec)
    config = transformers.AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_experts, config.num_experts_per_tok) == ("qwen3_moe", 16, 4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer("hello world, the quick brown fox").input_ids
    assert tokenizer.unk_token_id not in ids and len(ids) == 7
    tensors = load_file(str(path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == tensor_shapes(spec, config.vocab_size)
    assert all(v.dtype == torch.bfloat16 for v in tensors.values())


def test_spec_refuses_too_few_experts():
    with pytest.raises(ValueError, match=">= 8 experts"):
        TinyMoESpec(num_experts=4)
