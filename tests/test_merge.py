"""Adapter merging: linear is exact, TIES/DARE follow peft's merge_utils, merged requests run end to end."""

import pytest
import torch
from peft.utils import merge_utils

from server.adapters.merge import MergeSpec, disjoint_merge, magnitude_prune, merge, sign_agreement
from server.adapters.weights import AdapterKey, AdapterWeights
from server.config import AdapterConfig
from server.errors import ValidationError
from tests.adapter_factory import SPECS
from tests.conftest import ADAPTER_PROMPTS, collect, greedy, run


def adapter(name: str, rank: int, seed: int, modules=((0, "q_proj"),)) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    pairs = {m: (torch.randn(rank, 16, generator=g), torch.randn(12, rank, generator=g)) for m in modules}
    return AdapterWeights(AdapterKey("pbase", name), rank, pairs)


def delta(pair) -> torch.Tensor:
    return pair[1].double() @ pair[0].double()


def test_linear_merge_is_the_exact_weighted_sum_of_deltas_across_ranks():
    a, b = adapter("a", 4, 1), adapter("b", 8, 2, modules=((0, "q_proj"), (1, "v_proj")))
    merged = merge(MergeSpec(("a", "b"), (0.3, 0.7)), [a, b])
    q = (0, "q_proj")
    close = dict(atol=1e-5, rtol=1e-5)  # float32 weights, float64 products
    torch.testing.assert_close(delta(merged.modules[q]), 0.3 * delta(a.modules[q]) + 0.7 * delta(b.modules[q]), **close)
    torch.testing.assert_close(delta(merged.modules[(1, "v_proj")]), 0.7 * delta(b.modules[(1, "v_proj")]), **close)
    assert merged.rank == 12


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_ties_matches_peft_merge_utils(method, density):
    g = torch.Generator().manual_seed(7)
    tensors = torch.randn(3, 10, 6, generator=g)
    weights = torch.tensor([0.5, 1.0, 0.8])
    pruned = magnitude_prune(tensors, density)
    ours = disjoint_merge(pruned * weights.view(-1, 1, 1), sign_agreement(pruned, method))
    theirs = merge_utils.ties(list(tensors), weights, density, majority_sign_method=method)
    torch.testing.assert_close(ours, theirs)


def test_dare_keeps_about_density_rescaled_and_is_reproducible_per_spec():
    parts = [adapter("a", 8, 1), adapter("b", 8, 2)]
    spec = MergeSpec(("a", "b"), (1.0, 1.0), "dare_linear", density=0.3)
    first, second = merge(spec, parts), merge(spec, parts)
    a_merged = first.modules[(0, "q_proj")][0]
    torch.testing.assert_close(a_merged, second.modules[(0, "q_proj")][0])
    mean = (parts[0].modules[(0, "q_proj")][0] + parts[1].modules[(0, "q_proj")][0]).abs().mean()
    assert 0.6 < float(a_merged.abs().mean() / mean) < 1.6  # rescaling by 1/density keeps the scale


@pytest.mark.parametrize(
    "raw, message",
    [({"ids": []}, "non-empty"), ({"ids": ["a"], "weights": [1, 2]}, "one per id"),
     ({"ids": ["a"], "merge_strategy": "avg"}, "merge_strategy"), ({"ids": ["a"], "density": 0}, "density"),
     ({"ids": ["a"], "majority_sign_method": "x"}, "majority_sign_method")],
)
def test_bad_merge_specs_are_rejected(raw, message):
    with pytest.raises(ValidationError, match=message):
        MergeSpec.parse(raw, None)


def test_ties_refuses_different_ranks_with_a_clear_message():
    with pytest.raises(ValidationError, match="same rank"):
        merge(MergeSpec(("a", "b"), (1, 1), "ties", 0.5), [adapter("a", 4, 1), adapter("b", 8, 2)])


def test_merged_request_runs_and_a_single_weight_one_merge_equals_the_adapter(make_engine, adapter_root, references):
    engine = make_engine(adapters=AdapterConfig(adapters_dir=str(adapter_root)))
    name = f"{SPECS[1].name}/1"
    solo = {"ids": [name], "weights": [1.0], "merge_strategy": "linear"}
    tokens, _, _ = run(collect(engine, greedy(ADAPTER_PROMPTS[0], 32, merged_adapters=solo)))
    assert tokens == references[(SPECS[1].name, ADAPTER_PROMPTS[0])]
    mix = {"ids": [name, f"{SPECS[2].name}/1"], "weights": [0.5, 0.5]}
    mixed, _, text = run(collect(engine, greedy(ADAPTER_PROMPTS[0], 16, merged_adapters=mix)))
    assert len(mixed) > 0 and text
    assert engine.store.stats["loads"] >= 3  # two parts read + two merged adapters cached
