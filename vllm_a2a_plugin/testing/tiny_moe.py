"""A tiny random-weight Qwen3-MoE checkpoint and tokenizer, made locally.

Nothing is downloaded: the tokenizer is a word-level ``tokenizers`` model over
a fixed vocabulary, the weights come from a seeded generator, so the same seed
gives byte-identical safetensors. vLLM loads it like any Hugging Face
checkpoint directory.

    python -m vllm_a2a_plugin.testing.tiny_moe /tmp/tiny-moe --experts 8 --top-k 2
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
WORDS = ("the a an of to in and is was for on with as by at from that this it be are "
         "expert token rank model mixture route gate layer hidden weight sum one two three "
         "four five six seven eight nine ten hello world vllm serve fast quick brown fox "
         "jumps over lazy dog red green blue north south east west yes no").split()


@dataclass(frozen=True)
class TinyMoESpec:
    """Shape of the tiny model; defaults keep it a few MB."""

    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    moe_intermediate_size: int = 64
    num_experts: int = 8
    top_k: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0

    def __post_init__(self):
        if self.num_experts < 8 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need >= 8 experts and 1 <= top_k <= experts, got {self}")


# Qwen3-30B-A3B's architecture (its config.json), for engine benchmarks with
# load_format="dummy"; only the vocabulary is ours (a few hundred words).
QWEN3_30B_A3B = TinyMoESpec(num_layers=48, hidden_size=2048, num_heads=32, num_kv_heads=4,
                            head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                            num_experts=128, top_k=8, max_position_embeddings=4096)


def vocabulary() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    return list(SPECIAL_TOKENS) + WORDS + letters + digits + list(".,!?;:'\"-")


def write_tokenizer(directory: Path) -> int:
    """Word-level tokenizer (whitespace + punctuation split); returns vocab size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocabulary()))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "model_max_length": 1024,
        "chat_template": ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}"
                          "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                          "assistant{% endif %}"),
    }, indent=1))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "<unk>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return len(vocab)


def config_dict(spec: TinyMoESpec, vocab_size: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": spec.max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "eos_token_id": 1,
        "bos_token_id": 1,
        "pad_token_id": 1,
        "use_cache": True,
    }


def tensor_shapes(spec: TinyMoESpec, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor, in Hugging Face's Qwen3-MoE naming."""
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {"model.embed_tokens.weight": (vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (vocab_size, h)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (spec.head_dim,),
            p + "self_attn.k_norm.weight": (spec.head_dim,),
            p + "mlp.gate.weight": (spec.num_experts, h),
        })
        for e in range(spec.num_experts):
            ep = f"{p}mlp.experts.{e}."
            shapes.update({ep + "gate_proj.weight": (spec.moe_intermediate_size, h),
                           ep + "up_proj.weight": (spec.moe_intermediate_size, h),
                           ep + "down_proj.weight": (h, spec.moe_intermediate_size)})
    return shapes


def write_config_and_tokenizer(directory: str | Path, spec: TinyMoESpec) -> int:
    """Config, generation config and tokenizer, no weights: enough for vLLM's
    ``load_format="dummy"`` (random weights made on the GPU), which is how a model
    of realistic size is served without writing tens of GB. Returns the vocab size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(directory)
    (directory / "config.json").write_text(json.dumps(config_dict(spec, vocab_size), indent=1))
    (directory / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 1, "pad_token_id": 1, "do_sample": False}))
    return vocab_size


def make_tiny_moe(directory: str | Path, spec: TinyMoESpec = TinyMoESpec()) -> Path:
    """Write config, tokenizer and seeded random bf16 weights into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    vocab_size = write_config_and_tokenizer(directory, spec)
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    tensors = {}
    for name, shape in tensor_shapes(spec, vocab_size).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16, device="cpu")
        else:
            fan_in = shape[-1]
            tensors[name] = (torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu") / fan_in ** 0.5).to(torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "tiny_moe_spec.json").write_text(json.dumps(asdict(spec), indent=1))
    return directory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec = TinyMoESpec(num_layers=args.layers, hidden_size=args.hidden, num_experts=args.experts,
                       top_k=args.top_k, seed=args.seed)
    print(make_tiny_moe(args.directory, spec))


if __name__ == "__main__":
    main()
