"""Real PEFT adapters for the base model, made with peft itself (the reference we test against)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    alpha: int
    targets: tuple[str, ...]
    seed: int
    b_std: float = 0.02


SPECS = (
    AdapterSpec("attn-r8", 8, 16, ("q_proj", "v_proj"), seed=1, b_std=0.08),
    AdapterSpec("all-r32", 32, 32, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 2),
    AdapterSpec("mlp-r16", 16, 8, ("gate_proj", "up_proj", "down_proj", "o_proj"), seed=3, b_std=0.04),
)


def make_peft_adapter(base_dir: Path, out_dir: Path, spec: AdapterSpec) -> Path:
    """A LoRA with random non-zero A and B (B ~ N(0, b_std)), saved as a PEFT directory."""
    torch.manual_seed(spec.seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                        init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * spec.b_std)
    model.save_pretrained(out_dir)
    return out_dir


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from transformers + peft with that adapter alone (stops at EOS, like we do)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def peft_greedy_each(base_dir: Path, adapter_dirs: dict[str, Path], prompt_ids: list[int],
                     max_new_tokens: int) -> dict[str, list[int]]:
    """peft_greedy for many adapters, the base model loaded once (each adapter still alone)."""
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()
    out = {}
    with torch.no_grad():
        for name in names:
            model.set_adapter(name)
            tokens = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
            out[name] = tokens[0, len(prompt_ids):].tolist()
    return out


def corrupt_copy(src: Path, dst: Path) -> Path:
    """The same adapter with its safetensors file truncated."""
    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    data = (src / "adapter_model.safetensors").read_bytes()
    (dst / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return dst


def foreign_copy(src: Path, dst: Path) -> Path:
    """An adapter whose shapes belong to a wider base model (hidden 1024)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text(json.dumps(json.loads((src / "adapter_config.json").read_text())))
    tensors = {k: torch.zeros(v.shape[0], 1024) if "lora_A" in k else torch.zeros(1024, v.shape[1])
               for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def variant_copy(src: Path, dst: Path, seed: int) -> Path:
    """Another adapter of the same shape: the PEFT files of `src` with fresh random B matrices (cheap:
    no base model to load, so a test can make dozens)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=generator) * 0.05 if "lora_B" in k else v
               for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst
