"""Pure pieces: incremental detokenisation and the sampling math, table-driven."""

import pytest
import torch

from server.engine.detokenizer import BackendDecoder, IncrementalDetokenizer, text_decoder
from server.engine.engine import _matches_stop
from server.engine.request import SamplingParams
from server.engine.sampler import apply_penalties, warp


@pytest.mark.parametrize("text", ["Héllo wörld", "naïve café ☕ 日本語のテキスト 🚀🎉", " leading space", "a\n\nb  c"])
@pytest.mark.parametrize("backend", [False, True])
def test_incremental_text_equals_full_decode_and_never_splits_utf8(loaded, text, backend):
    tok = loaded.tokenizer
    prompt = tok("Say:")["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decoder = text_decoder(tok) if backend else tok
    assert isinstance(decoder, BackendDecoder) == backend  # (the default model's BPE: no clean-up)
    detok = IncrementalDetokenizer(decoder, prompt, loaded.special_token_ids)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids) == detok.text
    assert all("\ufffd" not in d for d in deltas)


def test_the_backend_decoder_returns_what_transformers_decode_does(loaded):
    """Over random ids, special ones among them, with and without skipping those."""
    tok, decoder = loaded.tokenizer, text_decoder(loaded.tokenizer)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, len(tok), (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        ids[0] = sorted(loaded.special_token_ids)[0] if ids[0] % 5 == 0 else ids[0]
        for skip in (True, False):
            assert decoder.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize(
    "text, delta, stops, expected",
    [
        ("hello world", "ld", ("world",), True),  # stop spans two tokens
        ("hello world", "ld", ("hello",), False),  # ended before this token: already handled
        ("abc", "c", ("",), False),
        ("x END", " END", ("END", "zzz"), True),
    ],
)
def test_stop_matching(text, delta, stops, expected):
    assert _matches_stop(text, delta, stops) is expected


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    kept = torch.isfinite(warp(logits, SamplingParams(top_k=2, do_sample=True)))
    assert kept.tolist() == [False, True, False, True, False]


@pytest.mark.parametrize("top_p, expected_kept", [(0.5, 1), (0.8, 2), (0.99, 3)])
def test_top_p_keeps_smallest_set_reaching_p(top_p, expected_kept):
    probs = torch.tensor([0.6, 0.3, 0.1])
    kept = torch.isfinite(warp(probs.log(), SamplingParams(top_p=top_p, do_sample=True)))
    assert int(kept.sum()) == expected_kept and kept[0]


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 2.0])
    cold = warp(logits, SamplingParams(temperature=0.5, do_sample=True)).softmax(-1)
    assert cold[1] > logits.softmax(-1)[1]


def test_typical_p_always_keeps_at_least_one():
    kept = torch.isfinite(warp(torch.tensor([10.0, 0.0, 0.0]), SamplingParams(typical_p=0.01, do_sample=True)))
    assert int(kept.sum()) >= 1


def test_repetition_penalty_follows_ctrl_rule():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1], output_ids=[])
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_frequency_and_presence_penalties_count_generated_tokens():
    logits = torch.zeros(3)
    out = apply_penalties(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=1.0),
                          prompt_ids=[2], output_ids=[0, 0, 1])
    assert out.tolist() == [-2.0, -1.5, 0.0]
