"""Tiny random checkpoints of every supported architecture, made with transformers' own config and
model classes (the reference), plus peft adapters for them and the transformers/peft greedy
reference. Weights are re-drawn wide (std 0.2, norms away from identity) so that every
architectural detail moves the logits by whole units and greedy choices are far from ties.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

VOCAB = 49152  # the default model's tokenizer, which every tiny checkpoint ships
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1,
               eos_token_id=2, pad_token_id=2)
WINDOW = 16  # sliding windows are shorter than the test prompts


@dataclass(frozen=True)
class TinyArch:
    name: str
    config: dict[str, Any]
    lora_targets: tuple[str, ...]  # a subset of the model's own module names, for the second adapter
    all_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    attn_implementation: str = "sdpa"
    extra: dict[str, Any] = field(default_factory=dict)


ARCHS = (
    TinyArch("llama3", dict(model_type="llama", rope_theta=500000.0, tie_word_embeddings=False,
                            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=32)), ("q_proj", "v_proj")),
    TinyArch("llama-linear-bias", dict(model_type="llama", attention_bias=True, mlp_bias=True, num_key_value_heads=1,
                                       rope_scaling=dict(rope_type="linear", factor=4.0)), ("o_proj", "down_proj")),
    TinyArch("llama-dynamic", dict(model_type="llama", max_position_embeddings=40, tie_word_embeddings=True,
                                   rope_scaling=dict(rope_type="dynamic", factor=2.0)), ("k_proj", "up_proj")),
    TinyArch("qwen3-yarn", dict(model_type="qwen3", head_dim=24, num_key_value_heads=1, tie_word_embeddings=True,
                                max_position_embeddings=128,
                                rope_theta=1000000.0, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                        original_max_position_embeddings=32)),
             ("q_proj", "k_proj", "gate_proj")),
    TinyArch("qwen3", dict(model_type="qwen3", head_dim=32, tie_word_embeddings=False), ("v_proj", "down_proj")),
    TinyArch("qwen2-sliding", dict(model_type="qwen2", use_sliding_window=True, sliding_window=WINDOW,
                                   max_window_layers=1), ("q_proj", "v_proj")),
    TinyArch("mistral-sliding", dict(model_type="mistral", sliding_window=WINDOW, head_dim=16), ("q_proj", "o_proj")),
    TinyArch("gemma2", dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                            final_logit_softcapping=3.0, sliding_window=WINDOW, hidden_activation="gelu_pytorch_tanh"),
             ("q_proj", "up_proj"), attn_implementation="eager"),
    TinyArch("gemma3_text", dict(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                 rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                  "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                     "rope_theta": 1000000.0}}),
             ("k_proj", "v_proj", "down_proj")),
    TinyArch("phi3-longrope", dict(model_type="phi3", tie_word_embeddings=False, partial_rotary_factor=0.75,
                                   original_max_position_embeddings=48, max_position_embeddings=192,
                                   rope_scaling=dict(type="longrope", short_factor=[1.0, 1.1, 1.3, 1.5, 2.0, 2.5],
                                                     long_factor=[1.5, 2.0, 3.0, 4.0, 6.0, 8.0])),
             ("qkv_proj",), all_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    TinyArch("phi3-sliding", dict(model_type="phi3", sliding_window=WINDOW, tie_word_embeddings=True),
             ("gate_up_proj", "o_proj"), all_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
)


def build_checkpoint(arch: TinyArch, out_dir: Path, tokenizer_dir: Path, seed: int = 0,
                     disk_dtype: torch.dtype = torch.float32, max_shard_size: str | None = None) -> Path:
    """Random weights in the architecture's own transformers class, saved with the tokenizer
    (as `disk_dtype`, in shards with an index when `max_shard_size` is given)."""
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[arch.config["model_type"]](**{**_COMMON, **arch.config})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:  # Gemma stores w for (1 + w): both styles end up away from identity
                param.copy_(noise * 0.3 + (0.0 if arch.config["model_type"].startswith("gemma") else 1.0))
            else:
                param.copy_(noise * 0.2)
    model.to(disk_dtype).save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


def build_adapter(model_dir: Path, out_dir: Path, targets: tuple[str, ...], rank: int, alpha: int, rslora: bool,
                  seed: int) -> Path:
    """A peft LoRA with random non-zero A and B on the given modules of the tiny model."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                        init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(out_dir)
    return out_dir


def reference_greedy(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], new_tokens: int,
                     attn_implementation: str) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs from transformers (+ peft), with its KV cache, never
    stopping at EOS. A fresh model per call: dynamic RoPE keeps state across calls in transformers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [step.log_softmax(-1)[0, t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def random_causal_lm(hf_config: dict[str, Any], device: torch.device):
    """loraserve's own CausalLM for an HF config, its weights drawn N(0, 0.2) (seed 0), on `device`
    (kernel tests that need a model but no reference checkpoint)."""
    from server.model.arch import ArchConfig
    from server.model.decoder import CausalLM

    torch.manual_seed(0)
    model = CausalLM(ArchConfig.from_hf(hf_config))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.init_rotaries(device)
    return model.to(device).eval()
