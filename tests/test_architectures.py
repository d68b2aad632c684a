"""Every supported architecture, served by the real HTTP server from a tiny random checkpoint,
against transformers (and peft with adapters): the same greedy tokens and log-probs, for prompts
longer than the sliding windows and past the RoPE switch points, in one mixed-adapter batch."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from server.model.default_model import default_model_dir
from tests.conftest import ServerProcess
from tests.model_factory import ARCHS, TinyArch, build_adapter, build_checkpoint, reference_greedy

PROMPTS = (  # ~12 and ~38 tokens: windows (16) are crossed while decoding and while prefilling
    "The quick brown fox jumps over the lazy dog near",
    "In a distant kingdom surrounded by tall mountains, an old clockmaker spent his days repairing the "
    "tiny gears of forgotten watches, dreaming of",
)
NEW_TOKENS = 24
ADAPTERS = {"all": dict(rank=8, alpha=16, rslora=False), "some": dict(rank=4, alpha=12, rslora=True)}


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    """The default model's tokenizer; LORASERVE_TEST_TOKENIZER_DIR names a folder holding just its
    files, where the model itself is not installed (the GPU run, bench/gpu/session.sh)."""
    override = os.environ.get("LORASERVE_TEST_TOKENIZER_DIR")
    return Path(override) if override else default_model_dir()


def build_arch(arch: TinyArch, root: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    model_dir = build_checkpoint(arch, root / "models" / arch.name, tokenizer_dir)
    adapters = root / "adapters"
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        targets = arch.all_targets if name == "all" else arch.lora_targets
        build_adapter(model_dir, adapters / name / "1", targets, seed=10 + i, **spec)
    return model_dir, adapters


def generate(url: str, prompt: str, adapter: str | None) -> dict:
    params = {"max_new_tokens": NEW_TOKENS, "details": True, "ignore_eos_token": True}
    if adapter:
        params["adapter_id"] = adapter
    response = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": params}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_architecture_matches_transformers_and_peft(arch: TinyArch, tmp_path: Path, tokenizer_dir: Path):
    model_dir, adapters = build_arch(arch, tmp_path, tokenizer_dir)
    server = ServerProcess("--model", str(model_dir), "--max-batch-size", "8",
                           env={"LORASERVE_ADAPTERS_DIR": str(adapters)}).wait_ready(timeout=120)
    try:
        cases = [(prompt, adapter) for prompt in PROMPTS for adapter in (None, "all/1", "some/1")]
        with ThreadPoolExecutor(len(cases)) as pool:  # concurrent: base and both adapters share batches
            results = list(pool.map(lambda case: generate(server.url, *case), cases))
        info = httpx.get(server.url + "/info").json()
    finally:
        server.stop()
    assert info["model_id"] == arch.name
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for (prompt, adapter), result in zip(cases, results):
        prompt_ids = tokenizer(prompt)["input_ids"]
        adapter_dir = adapters / adapter.split("/")[0] / "1" if adapter else None
        expected, logprobs = reference_greedy(model_dir, adapter_dir, prompt_ids, NEW_TOKENS, arch.attn_implementation)
        tokens = result["details"]["tokens"]
        assert [t["id"] for t in tokens] == expected, (arch.name, adapter, prompt[:20])
        assert [t["logprob"] for t in tokens] == pytest.approx(logprobs, abs=2e-3), (arch.name, adapter)


def test_sharded_bf16_checkpoint_ends_on_every_generation_config_eos(tmp_path: Path, tokenizer_dir: Path):
    """Shards with an index, bf16 on disk served as fp32, and generation_config.json's list of
    EOS ids (Llama 3 Instruct ends on any of three): the reply ends at the first listed id."""
    model_dir = build_checkpoint(ARCHS[0], tmp_path / "sharded", tokenizer_dir, disk_dtype=torch.bfloat16,
                                 max_shard_size="2MB")
    assert len(list(model_dir.glob("*.safetensors"))) > 2 and (model_dir / "model.safetensors.index.json").is_file()
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(model_dir)(PROMPTS[1])["input_ids"]
    expected, _ = reference_greedy(model_dir, None, prompt_ids, NEW_TOKENS, "sdpa")
    stop_at = next(i for i in range(3, NEW_TOKENS) if expected[i] not in expected[:i])
    generation = model_dir / "generation_config.json"
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "eos_token_id": [2, expected[stop_at]]}))
    server = ServerProcess("--model", str(model_dir)).wait_ready(timeout=120)
    try:
        body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
        result = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    finally:
        server.stop()
    assert [t["id"] for t in result["details"]["tokens"]] == expected[: stop_at + 1]
    assert result["details"]["finish_reason"] == "eos_token"


REFUSED = [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'; supported: llama, mistral, qwen2, qwen3"),
    ({"model_type": "mixtral"}, "mixture-of-experts"),
    ({"model_type": "qwen3_moe"}, "mixture-of-experts"),
    ({"model_type": "gemma3"}, "vision tower"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "proportional", "factor": 2.0}},
     "unsupported rope_type 'proportional'"),
    ({"model_type": "llama", "hidden_act": "relu"}, "activation 'relu'"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
]


@pytest.mark.parametrize("config,message", REFUSED, ids=[c["model_type"] + str(i) for i, (c, _) in enumerate(REFUSED)])
def test_configs_that_cannot_be_run_exactly_are_refused(config: dict, message: str):
    from server.errors import UnsupportedModelError
    from server.model.arch import ArchConfig

    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        ArchConfig.from_hf({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, **config})


def test_checkpoint_with_weights_the_decoder_lacks_is_refused(tmp_path: Path, tokenizer_dir: Path):
    """A tensor with no place in the decoder (here a q_norm in a Llama checkpoint) is refused, never dropped."""
    from safetensors.torch import load_file, save_file

    from server.errors import UnsupportedModelError
    from server.model.decoder import CausalLM

    model_dir = build_checkpoint(ARCHS[0], tmp_path / "m", tokenizer_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(64)
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="no place for"):
        CausalLM.from_pretrained(model_dir, torch.device("cpu"), torch.float32)


def test_adapter_for_other_module_names_is_refused(tmp_path: Path, tokenizer_dir: Path):
    """A Llama-style adapter (q_proj) on Phi-3, whose modules are qkv_proj: a clear 424, not a guess."""
    from server.adapters.weights import AdapterKey, AdapterLoadError, read_adapter
    from server.model.arch import ArchConfig

    llama = next(a for a in ARCHS if a.name == "llama3")
    phi3 = next(a for a in ARCHS if a.name == "phi3-sliding")
    _, adapters = build_arch(llama, tmp_path / "llama", tokenizer_dir)
    phi3_config = json.loads((build_checkpoint(phi3, tmp_path / "phi3", tokenizer_dir) / "config.json").read_text())
    with pytest.raises(AdapterLoadError, match="targets a module the base model does not have"):
        read_adapter(AdapterKey("pbase", "all/1"), adapters / "all" / "1", ArchConfig.from_hf(phi3_config))


@pytest.mark.parametrize("targets,extra,message", [
    (("embed_tokens", "q_proj"), {}, "LoRA on the embeddings or the LM head is not supported"),
    (("q_proj",), {"use_dora": True}, "use_dora=true is not supported"),
    (("q_proj",), {"modules_to_save": ["lm_head"]}, "modules_to_save is not supported"),
])
def test_adapters_that_cannot_be_applied_exactly_are_refused(tmp_path: Path, tokenizer_dir: Path, targets, extra,
                                                             message):
    """Made by peft itself; each gets a 424 saying why, never an approximation."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from server.adapters.weights import AdapterKey, AdapterLoadError, read_adapter
    from server.model.arch import ArchConfig

    model_dir = build_checkpoint(ARCHS[0], tmp_path / "m", tokenizer_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **extra)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(tmp_path / "a")
    arch = ArchConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    with pytest.raises(AdapterLoadError, match=re.escape(message)):
        read_adapter(AdapterKey("pbase", "a/1"), tmp_path / "a", arch)


def test_openai_requests_take_generation_config_sampling_defaults(tmp_path: Path, tokenizer_dir: Path):
    """generation_config.json's sampling defaults apply to what an OpenAI request leaves out (here
    top_k 1: the reply is the greedy one), and the request's own fields win over them."""
    from openai import OpenAI

    model_dir = build_checkpoint(ARCHS[0], tmp_path / "m", tokenizer_dir)
    generation = model_dir / "generation_config.json"
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "do_sample": True, "temperature": 0.9,
                                      "top_k": 1}))
    server = ServerProcess("--model", str(model_dir)).wait_ready(timeout=120)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")

        def complete(**kw) -> str:
            return client.completions.create(model="", prompt=PROMPTS[1], max_tokens=16, **kw).choices[0].text

        greedy = complete(temperature=0)
        assert complete() == greedy and complete(seed=7) == greedy
        assert complete(seed=7, extra_body={"top_k": 50}) != greedy  # the request's own top_k wins
    finally:
        server.stop()
