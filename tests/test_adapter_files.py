"""Reading a peft adapter file: the one-buffer read equals safetensors' own, the factors come out in
the serving dtype with the scale folded in, and damaged files are refused by name. (Serving equal to
peft is tests/test_adapters.py.)"""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.lora import ResidentAdapters, slot_width
from server.adapters.weights import AdapterKey, AdapterLoadError, ReadBuffer, read_adapter
from tests.adapter_factory import SPECS

KEY = AdapterKey("local", "under-test/1")



def own_model(loaded):
    """A model of its own for a test's adapter tier (the served one can't be deep-copied: its CPU
    weights are oneDNN-packed)."""
    from server.model.decoder import CausalLM

    return CausalLM.from_pretrained(loaded.model_dir, loaded.device, loaded.dtype)


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

    read = _read_one_dtype(source / "adapter_model.safetensors", ReadBuffer())
    assert read is not None
    want = load_file(str(source / "adapter_model.safetensors"))
    assert read.shapes.keys() == want.keys()
    assert all(torch.equal(read.tensor(k), want[k]) for k in want)
    q_a = sorted((k for k in want if "q_proj.lora_A" in k), key=lambda k: read.offsets[k])
    stacked = read.stacked(q_a)  # peft's layout: one strided view of the buffer, no copy
    assert stacked is not None and stacked.data_ptr() == read.tensor(q_a[0]).data_ptr()
    assert torch.equal(stacked, torch.stack([want[k] for k in q_a]))


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
    lambda h: first(h).update(shape=[1] * 300_000),  # refused before multiplying out (seconds, GIL held)
    lambda h: first(h).update(shape=[1e400, 1]),  # JSON's infinity
    lambda h: first(h).update(shape=[2.5, 4]),
    lambda h: first(h).update(data_offsets=[0, 1e400]),
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


def expected_modules(directory: Path, scale: float, dtype: torch.dtype) -> dict:
    """From safetensors and the spec: (A, B * alpha / r) per (layer, projection), rounded once to dtype."""
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    out = {}
    for name, a in tensors.items():
        if ".lora_A." in name:
            layer, proj = int(name.split("layers.")[1].split(".")[0]), name.split(".lora_A")[0].rsplit(".", 1)[1]
            out[(layer, proj)] = (a.to(dtype), (tensors[name.replace("lora_A", "lora_B")] * scale).to(dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_factors_are_the_file_scaled_in_the_serving_dtype(adapter_root, loaded, dtype):
    for spec in SPECS:
        directory = adapter_root / spec.name / "1"
        adapter = read_adapter(KEY, directory, loaded.model.config, dtype)
        want = expected_modules(directory, spec.alpha / spec.rank, dtype)
        assert adapter.modules.keys() == want.keys() and adapter.rank == spec.rank
        for key, (a, b) in adapter.modules.items():
            assert a.dtype == b.dtype == dtype
            assert torch.equal(a, want[key][0]) and torch.equal(b, want[key][1]), key


def test_unevenly_laid_out_files_are_read_tensor_by_tensor_to_the_same_values(adapter_root, tmp_path, loaded):
    """One layer at a lower rank (peft's rank_pattern) breaks the even spacing of the others: the
    strided view is refused and each tensor is copied on its own, to the same values."""
    source = adapter_root / SPECS[1].name / "1"
    low = 16

    def lower_layer_5(tensors):
        return {k: (v[:low] if ".lora_A." in k else v[:, :low]).contiguous() if "layers.5." in k else v
                for k, v in tensors.items()}

    uneven = copy_with(source, tmp_path / "uneven", lower_layer_5)
    read = read_adapter(KEY, uneven, loaded.model.config)
    from server.adapters.weights import _read_one_dtype

    tensors = _read_one_dtype(uneven / "adapter_model.safetensors", ReadBuffer())
    q_a = sorted((k for k in tensors.shapes if "q_proj.lora_A" in k and "layers.5." not in k),
                 key=lambda k: tensors.offsets[k])
    assert tensors.stacked(q_a) is None
    full, lowered = expected_modules(uneven, SPECS[1].alpha / SPECS[1].rank, torch.float32), \
        expected_modules(uneven, SPECS[1].alpha / low, torch.float32)
    for key, (a, b) in read.modules.items():
        want = lowered[key] if key[0] == 5 else full[key]
        assert torch.equal(a, want[0]) and torch.equal(b, want[1]), key


def test_a_reused_buffer_leaves_nothing_shared_with_what_it_read(adapter_root, tmp_path, loaded):
    """The loader's buffer is overwritten by its next read: what an earlier read returned must not
    view it, even where the file's dtype is the serving dtype (no conversion)."""
    larger, smaller = adapter_root / SPECS[1].name / "1", adapter_root / SPECS[0].name / "1"
    size = lambda d: (d / "adapter_model.safetensors").stat().st_size  # noqa: E731
    assert size(larger) > size(smaller)
    to_bf16 = lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()}  # noqa: E731
    for dtype in (torch.float32, torch.bfloat16):
        if dtype is torch.bfloat16:  # a bf16 file served in bf16: no conversion at all
            larger, smaller = (copy_with(d, tmp_path / f"bf16-{d.parent.name}", to_bf16) for d in (larger, smaller))
        buffer = ReadBuffer()
        first = read_adapter(KEY, larger, loaded.model.config, dtype, buffer)  # the buffer sized by it, then reused
        kept = {k: (a.clone(), b.clone()) for k, (a, b) in first.modules.items()}
        read_adapter(KEY, smaller, loaded.model.config, dtype, buffer)
        assert all(torch.equal(a, kept[k][0]) and torch.equal(b, kept[k][1]) for k, (a, b) in first.modules.items())


def test_activation_writes_the_factors_and_zeros_past_the_rank(adapter_root, tmp_path, loaded):
    """A rows and B^T rows in the adapter's columns; a narrower adapter reusing a wider one's
    columns leaves zeros past its rank, and zeros in projections it does not target."""
    model = own_model(loaded)
    tier = ResidentAdapters(model, 1, 2**30)  # one resident: the second reuses the first's columns
    wide = read_adapter(KEY, adapter_root / SPECS[1].name / "1", loaded.model.config, torch.float32)
    assert tier.activate(wide, set())
    assert any(t.lora.a[4:8].any() for t in tier.projections.values())  # wide's weights where narrow's zeros go
    rank_4 = copy_with(adapter_root / SPECS[0].name / "1", tmp_path / "rank-4",
                       lambda t: {k: (v[:4] if ".lora_A." in k else v[:, :4]).contiguous() for k, v in t.items()})
    narrow = read_adapter(AdapterKey("local", "narrow/1"), rank_4, loaded.model.config, torch.float32)
    assert narrow.rank == 4 and tier.activate(narrow, set()) and not tier.is_active(wide)
    lo, hi = tier._columns[narrow]
    assert lo == 0 and hi == slot_width(4) == 8  # 4 columns of weights, 4 of zeros where wide's were
    for key, target in tier.projections.items():
        a_rows, b_rows = target.lora.a[: slot_width(SPECS[1].rank)], target.lora.b_t[: slot_width(SPECS[1].rank)]
        pair = narrow.modules.get(key)
        r = 0 if pair is None else pair[0].shape[0]
        if pair is not None:
            assert torch.equal(a_rows[:r], pair[0]) and torch.equal(b_rows[:r], pair[1].t())
        assert not a_rows[r:hi].any() and not b_rows[r:hi].any(), key


def test_a_preallocated_pool_is_made_whole_at_the_first_activation(adapter_root, loaded):
    """Nothing before an adapter is used; the whole budget at the first activation; no growth after."""
    model = own_model(loaded)
    tier = ResidentAdapters(model, 0, 64 * 2**20, preallocate=True)
    assert tier.capacity == 0
    first, second = (read_adapter(AdapterKey("local", f"{s.name}/1"), adapter_root / s.name / "1", loaded.model.config)
                     for s in SPECS[:2])
    assert tier.activate(first, set())
    budget = tier.capacity
    assert budget * tier._column_bytes <= 64 * 2**20 < (budget + 8) * tier._column_bytes
    assert tier.activate(second, set()) and tier.capacity == budget


def test_the_first_load_makes_the_pool_so_the_first_activation_only_installs_it(adapter_root, loaded):
    """The pool is zeroed on the loader thread (make_pool, wired to the store's before_load), not on
    the engine thread where it stalled every stream: the activation takes those very buffers."""
    model = own_model(loaded)
    tier = ResidentAdapters(model, 0, 64 * 2**20, preallocate=True)
    tier.make_pool()
    made = [group.a.data_ptr() for group in tier._made]
    assert tier.capacity == 0 and all(m.lora is None for m in tier.projections.values())
    adapter = read_adapter(KEY, adapter_root / SPECS[0].name / "1", loaded.model.config)
    assert tier.activate(adapter, set())
    assert [group.a.data_ptr() for group in tier._packed] == made
    assert all(tier.projections[key].lora.group is group for keys, group in zip(tier.groups, tier._packed)
               for key in keys)
    assert tier.capacity * tier._column_bytes <= 64 * 2**20 and tier._made is None
    tier.make_pool()  # later loads: nothing more is made
    assert tier._made is None


def test_the_builder_has_the_first_load_make_the_pool(adapter_root, make_engine):
    """The store's before_load is the device tier's make_pool: one load, and the pool is made off the
    engine thread, at the budget's size, for the first activation to install (tested above)."""
    from server.config import AdapterConfig

    engine = make_engine(AdapterConfig(adapters_dir=str(adapter_root)))
    tier = engine.engine.scheduler.adapters
    if not tier.preallocated:
        pytest.skip("this host's free memory does not preallocate the adapter pool")
    assert tier.capacity == 0 and tier._made is None
    engine.store.get(engine.store.key_for(f"{SPECS[0].name}/1", None)).result()
    made = tier._made
    assert made is not None and len(made) == len(tier.groups)
    assert made[0].a.shape[0] == tier._budget_columns()
