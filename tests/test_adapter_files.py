"""Reading a peft adapter file: the one-buffer read equals safetensors' own, and damaged files are
refused by name. (Serving equal to peft is tests/test_adapters.py.)"""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.lora import ResidentAdapters, packed_rows, slot_width
from server.adapters.weights import AdapterKey, AdapterLoadError, read_adapter
from tests.adapter_factory import SPECS

KEY = AdapterKey("local", "under-test/1")


def copy_with(src: Path, dst: Path, change) -> Path:
    """The adapter at `src` with its tensors passed through `change(dict) -> dict`, saved to `dst`."""
    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    save_file(change(load_file(str(src / "adapter_model.safetensors"))), str(dst / "adapter_model.safetensors"))
    return dst


def first_b(tensors: dict) -> str:
    return sorted(name for name in tensors if "lora_B" in name)[0]


@pytest.fixture
def source(adapter_root) -> Path:
    return adapter_root / SPECS[0].name / "1"


def as_read(directory: Path, arch) -> dict:
    return {k: (a.clone(), b.clone()) for k, (a, b) in read_adapter(KEY, directory, arch).modules.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_file_reads_as_its_values(source, tmp_path, loaded, dtype):
    half = copy_with(source, tmp_path / "half", lambda t: {k: v.to(dtype) for k, v in t.items()})
    want = {k: (a.to(dtype).float(), b) for k, (a, b) in as_read(source, loaded.model.config).items()}
    got = as_read(half, loaded.model.config)
    assert set(got) == set(want)
    for key, (a, b) in got.items():
        assert a.dtype == torch.float32 and torch.equal(a, want[key][0])
        torch.testing.assert_close(b, want[key][1], rtol=1e-2, atol=1e-3)


def test_mixed_dtypes_go_through_safetensors_and_read_the_same(source, tmp_path, loaded):
    def mix(tensors):
        name = first_b(tensors)
        return {**tensors, name: tensors[name].to(torch.bfloat16)}

    want = as_read(source, loaded.model.config)
    got = as_read(copy_with(source, tmp_path / "mixed", mix), loaded.model.config)
    assert got.keys() == want.keys()
    for key, (a, b) in got.items():
        assert torch.equal(a, want[key][0])
        torch.testing.assert_close(b, want[key][1], rtol=1e-2, atol=1e-3)


def test_the_one_buffer_read_equals_safetensors(source, loaded):
    from server.adapters.weights import _read_one_dtype

    read = _read_one_dtype(source / "adapter_model.safetensors")
    assert read is not None
    want = load_file(str(source / "adapter_model.safetensors"))
    assert read[0].keys() == want.keys()
    assert all(torch.equal(read[0][k], want[k]) for k in want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused_by_name(source, tmp_path, loaded, bad):
    def spoil(tensors):
        name = first_b(tensors)
        tensors[name][0, 0] = bad
        return tensors

    name = first_b(load_file(str(source / "adapter_model.safetensors")))
    with pytest.raises(AdapterLoadError, match=f"weight '{name}' is not finite"):
        read_adapter(KEY, copy_with(source, tmp_path / "nan", spoil), loaded.model.config)


def test_huge_finite_weights_are_not_mistaken_for_inf(source, tmp_path, loaded):
    """The whole-buffer sum overflows; the check of each tensor then clears them."""
    big = copy_with(source, tmp_path / "big", lambda t: {k: torch.full_like(v, 3e38) if "lora_A" in k else v
                                                          for k, v in t.items()})
    assert read_adapter(KEY, big, loaded.model.config).rank == SPECS[0].rank


def rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def first(h: dict) -> dict:
    return h[min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])]


def second(h: dict) -> dict:
    return h[sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[1]]


@pytest.mark.parametrize("edit", [
    lambda h: first(h).update(data_offsets=[0, 10**12]),  # past the end
    lambda h: first(h).update(shape=[3, 3]),  # size disagrees with shape
    lambda h: first(h).update(shape=[-2, -first(h)["shape"][0] * first(h)["shape"][1] // 2]),  # negative sizes
    lambda h: second(h).update(data_offsets=first(h)["data_offsets"]),  # two tensors on the same bytes
    lambda h: first(h).update(dtype="I64"),  # not a float: read by safetensors, refused as not floating point
])
def test_inconsistent_headers_are_corrupt(source, tmp_path, loaded, edit):
    broken = copy_with(source, tmp_path / "broken", lambda t: t)
    rewrite_header(broken / "adapter_model.safetensors", edit)
    with pytest.raises(AdapterLoadError, match="corrupt adapter_model.safetensors|is not finite floating point"):
        read_adapter(KEY, broken, loaded.model.config)


def test_a_header_that_is_not_a_table_is_corrupt(source, tmp_path, loaded):
    broken = copy_with(source, tmp_path / "list", lambda t: t)
    raw = b"[1, 2, 3]     "
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8:])
    with pytest.raises(AdapterLoadError, match="corrupt adapter_model.safetensors"):
        read_adapter(KEY, broken, loaded.model.config)


def test_a_file_too_short_for_its_header_is_corrupt(source, tmp_path, loaded):
    broken = copy_with(source, tmp_path / "short", lambda t: t)
    (broken / "adapter_model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(AdapterLoadError, match="corrupt adapter_model.safetensors"):
        read_adapter(KEY, broken, loaded.model.config)


def test_staged_rows_are_the_modules_in_the_packed_layout(adapter_root, loaded):
    """What the loader thread stages is what activation used to compute: A rows, B^T rows, zero
    padding to whole slots, in the tier's dtype."""
    for spec in SPECS:
        adapter = read_adapter(KEY, adapter_root / spec.name / "1", loaded.model.config)
        width = slot_width(adapter.rank)
        for dtype in (torch.float32, torch.bfloat16):
            rows = packed_rows(adapter, dtype)
            assert rows.keys() == adapter.modules.keys()
            for key, (a, b) in adapter.modules.items():
                a_rows, b_rows = rows[key]
                r = a.shape[0]
                assert a_rows.shape == (width, a.shape[1]) and b_rows.shape == (width, b.shape[0])
                assert torch.equal(a_rows[:r], a.to(dtype)) and torch.equal(b_rows[:r], b.t().to(dtype))
                assert not a_rows[r:].any() and not b_rows[r:].any()


def test_activation_takes_the_staged_rows_once(adapter_root, loaded):
    import copy

    model = copy.deepcopy(loaded.model)
    tier = ResidentAdapters(model, 0, 2**30)
    adapter = read_adapter(KEY, adapter_root / SPECS[0].name / "1", loaded.model.config)
    tier.stage(adapter)
    assert adapter.staged is not None
    assert tier.activate(adapter, set())
    assert adapter.staged is None
    (layer, proj), (a, b) = next(iter(adapter.modules.items()))
    target = tier.projections[(layer, proj)]
    lo, r = tier._columns[adapter][0], a.shape[0]
    assert torch.equal(target.lora.a[lo : lo + r], a) and torch.equal(target.lora.b_t[lo : lo + r], b.t())


def test_a_preallocated_pool_is_made_whole_at_the_first_activation(adapter_root, loaded):
    """Nothing before an adapter is used; the whole budget at the first activation; no growth after."""
    import copy

    model = copy.deepcopy(loaded.model)
    tier = ResidentAdapters(model, 0, 64 * 2**20, preallocate=True)
    assert tier.capacity == 0
    first, second = (read_adapter(AdapterKey("local", f"{s.name}/1"), adapter_root / s.name / "1", loaded.model.config)
                     for s in SPECS[:2])
    assert tier.activate(first, set())
    budget = tier.capacity
    assert budget * tier._column_bytes <= 64 * 2**20 < (budget + 8) * tier._column_bytes
    assert tier.activate(second, set()) and tier.capacity == budget
