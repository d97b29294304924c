"""optlm's AVX2 CPU kernels: each equals a float64 reference on every shape edge (row tails, input tails,
the int8 kernel's int32 chunking), results do not depend on the thread count, bad input is refused, and
without a compiler everything falls back to PyTorch's kernels with one warning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from optlm import kernels

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"kernels unavailable here: {kernels.unavailable_reason()}")

# M covers 1..MB, MB + tails; K covers tails of the 8- and 16-wide loops and more than one int8 CHUNK (4096).
SHAPES = [(1, 7, 64), (2, 5, 24), (3, 33, 100), (4, 16, 128), (5, 9, 8), (13, 40, 200), (1, 6, 4096 * 2 + 19)]
# Shapes the int8 tile kernel takes (4+ rows, K a multiple of 64, N of 32), row counts off its 16-row tiles.
TILE_SHAPES = [(4, 32, 64), (17, 64, 192), (37, 96, 768), (130, 32, 4096 + 64)]


def _ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@needs_kernels
@pytest.mark.parametrize(("M", "N", "K"), SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_float_kernels_match_float64(M, N, K, with_bias):
    g = torch.Generator().manual_seed(M * 1000 + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g) if with_bias else None
    for fn, weight in ((kernels.linear_f32, w), (kernels.linear_bf16, w.bfloat16())):
        got, want = fn(x, weight, bias), _ref(x, weight, bias)
        assert got.dtype == torch.float32 and got.shape == (M, N)
        # fp32 accumulation of K products: error grows like sqrt(K) * eps * |x||w|
        tol = 8 * K**0.5 * 2**-24 * (x.abs().max() * weight.float().abs().max()).item() * K**0.5
        assert (got.double() - want).abs().max().item() <= tol


@needs_kernels
@pytest.mark.parametrize(("M", "N", "K"), SHAPES + TILE_SHAPES)
def test_int8_kernel_within_int16_rounding_of_float64(M, N, K):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(M, K, generator=g)
    x[0, 0] = 40.0  # an outlier sets the row's int16 scale
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    scales, bias = torch.rand(N, generator=g) / 100, torch.randn(N, generator=g)
    got = kernels.linear_int8(x, q, scales, bias)
    want = _ref(x, q.double() * scales.double()[:, None], bias)
    # Each x is rounded to the nearest multiple of max|row| / 32767: error <= half a step per product.
    step = x.abs().amax(dim=1, keepdim=True).double() / 32767
    bound = step / 2 * (q.double().abs() * scales.double()[:, None]).sum(1)[None, :]
    assert ((got.double() - want).abs() <= bound * 1.01 + 1e-4).all()


@needs_kernels
@pytest.mark.parametrize(("M", "N", "K", "group"), [(1, 7, 64, 32), (3, 33, 256, 64), (5, 16, 768, 128),
                                                   (13, 9, 512, 256), (8, 4, 4096 * 2, 256)])
def test_int4_kernel_within_int16_rounding_of_float64(M, N, K, group):
    g = torch.Generator().manual_seed(K + M)
    x = torch.randn(M, K, generator=g)
    q = torch.randint(0, 16, (N, K), generator=g)
    scales, mins = torch.rand(N, K // group, generator=g) / 10, -torch.rand(N, K // group, generator=g)
    bias = torch.randn(N, generator=g)
    packed = kernels.pack_int4(q)
    assert packed.shape == (N, K // 2) and torch.equal(kernels.unpack_int4(packed), q.to(torch.uint8))
    got = kernels.linear_int4(x, packed, scales, mins, group, bias)
    w = q.double() * scales.double().repeat_interleave(group, 1) + mins.double().repeat_interleave(group, 1)
    want = _ref(x, w, bias)
    step = x.abs().amax(dim=1, keepdim=True).double() / 32767
    bound = step / 2 * w.abs().sum(1)[None, :]
    assert ((got.double() - want).abs() <= bound * 1.01 + 1e-4).all()
    with pytest.raises(ValueError, match="group_size"):
        kernels.linear_int4(x, packed, scales, mins, 48, bias)


@needs_kernels
def test_int4_layer_same_with_either_packing(monkeypatch):
    from optlm.quantize import Int4Linear

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 48)
    x = torch.randn(3, 5, 128)
    ours = Int4Linear.from_float(dense, group_size=32)
    monkeypatch.setattr(kernels, "_lib", None)  # as on a machine where the kernels cannot be built
    monkeypatch.setattr(kernels, "_error", "off for this test")
    theirs = Int4Linear.from_float(dense, group_size=32)
    assert (ours.packing, theirs.packing) == ("optlm", "torch")
    with torch.no_grad():
        want = theirs(x)  # PyTorch's kernel, bf16 activations
        monkeypatch.undo()
        got = ours(x)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))


@needs_kernels
@pytest.mark.parametrize(("M", "N"), [(2, 3), (5, 32)])  # the AVX loop; the tile kernel where the CPU has it
def test_int8_kernel_cannot_overflow(M, N):
    # Every product at the int16/int8 extremes, over several int32 chunks: the exact sum needs > 31 bits.
    K = 4096 * 3
    x = torch.full((M, K), 5.0)
    x[-1] = -5.0  # the tile kernel splits int16 into a signed high and an unsigned low byte: both signs
    q = torch.full((N, K), 127, dtype=torch.int8)
    q[1] = -127
    got = kernels.linear_int8(x, q, torch.ones(N))
    want = _ref(x, q.double(), None)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


@needs_kernels
def test_int8_rows_give_the_same_result_alone_or_in_a_prompt():
    # A prompt's rows (the tile kernel, where the CPU has it) and the same rows one at a time (decoding's loop)
    # share the int16 quantization and exact integer sums; only the float epilogue (times the scales, plus
    # bias: fused multiply-adds or not, as the compiler vectorised each loop) may differ, by an ulp or two.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 768, generator=g) * torch.rand(37, 1, generator=g) * 10
    q = torch.randint(-127, 128, (96, 768), dtype=torch.int8, generator=g)
    s, bias = torch.rand(96, generator=g) / 100, torch.randn(96, generator=g)
    together = kernels.linear_int8(x, q, s, bias)
    alone = torch.cat([kernels.linear_int8(x[i:i + 1], q, s, bias) for i in range(37)])
    torch.testing.assert_close(together, alone, rtol=5e-7, atol=1e-6)


@needs_kernels
def test_amx_is_used_where_the_cpu_has_it():
    flags = open("/proc/cpuinfo", encoding="utf-8").read() if os.path.exists("/proc/cpuinfo") else ""
    if " amx_int8" not in flags:
        pytest.skip("this CPU has no AMX-INT8; the AVX loop runs every int8 call")
    assert kernels.amx_int8()


@needs_kernels
def test_zero_rows_give_the_bias():
    x, q, w = torch.zeros(2, 48), torch.ones(5, 48, dtype=torch.int8), torch.randn(5, 48)
    bias = torch.randn(5)
    assert torch.equal(kernels.linear_int8(x, q, torch.ones(5), bias), bias.expand(2, 5))
    assert torch.equal(kernels.linear_f32(x, w, bias), bias.expand(2, 5))


@needs_kernels
def test_same_bits_for_any_thread_count():
    x, w = torch.randn(3, 256), torch.randn(301, 256)
    q, s = torch.randint(-127, 128, (301, 256), dtype=torch.int8), torch.rand(301)
    xt, qt, st = torch.randn(37, 256), torch.randint(-127, 128, (96, 256), dtype=torch.int8), torch.rand(96)  # tiles
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append((kernels.linear_f32(x, w), kernels.linear_bf16(x, w.bfloat16()), kernels.linear_int8(x, q, s),
                         kernels.linear_int8(xt, qt, st)))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))


@needs_kernels
def test_bad_input_is_refused():
    x, w = torch.randn(2, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match="expected x"):
        kernels.linear_f32(x, torch.randn(4, 8))
    with pytest.raises(TypeError, match="float32 x"):
        kernels.linear_f32(x.double(), w)
    with pytest.raises(TypeError, match="bfloat16 weight"):
        kernels.linear_bf16(x, w)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.linear_f32(x, torch.randn(16, 4).T)
    with pytest.raises(ValueError, match="bias"):
        kernels.linear_f32(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="scales"):
        kernels.linear_int8(x, torch.zeros(4, 16, dtype=torch.int8), torch.ones(3))


@needs_kernels
def test_build_is_cached_and_keyed(tmp_path):
    env = {**os.environ, "OPTLM_CACHE": str(tmp_path)}
    code = "from optlm import kernels; assert kernels.available(), kernels.unavailable_reason()"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("optlm-kernels-") and built[0].suffix == ".so"


@pytest.mark.parametrize("how", ["no_compiler", "turned_off"])
def test_falls_back_to_pytorch_kernels(tmp_path, how):
    """Without a compiler: PyTorch's kernels and one warning saying why; turned off on purpose: no warning."""
    env = {**os.environ, "OPTLM_CACHE": str(tmp_path)}
    if how == "no_compiler":
        env.update(PATH=str(tmp_path), CC="")
    else:
        env["OPTLM_KERNELS"] = "0"
    code = """
import warnings, torch, optlm
from optlm import kernels
torch.manual_seed(0)
cfg = optlm.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                      max_position_embeddings=64)
ref = optlm.OPTForCausalLM(cfg).eval()
model = optlm.quantize(optlm.OPTForCausalLM(cfg).eval(), "int8")
model.load_state_dict(optlm.quantize(ref, "int8").state_dict())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ids = torch.randint(4, 128, (1, 6))
    with torch.no_grad():
        for _ in range(3):
            out = model(ids).logits
assert not kernels.available()
assert torch.isfinite(out).all()
said = [str(w.message) for w in caught if "AVX2 kernels are not used" in str(w.message)]
assert len(said) == WARNINGS, said
print(kernels.unavailable_reason())
"""
    code = code.replace("WARNINGS", "1" if how == "no_compiler" else "0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ("no C compiler" if how == "no_compiler" else "OPTLM_KERNELS=0") in proc.stdout


@needs_kernels
@pytest.mark.parametrize(("B", "H", "D", "S"), [(1, 1, 8, 1), (3, 2, 64, 37), (5, 12, 64, 130), (2, 3, 20, 9)])
def test_paged_decode_attention_matches_float64_softmax_attention(B, H, D, S):
    g = torch.Generator().manual_seed(B * 100 + S)
    pool = 4 * B * S
    k, v = torch.randn(pool, H, D, generator=g), torch.randn(pool, H, D, generator=g)
    q = torch.randn(B, H, D, generator=g) / D**0.5
    slots = torch.randperm(pool, generator=g)[:B * S].view(B, S).contiguous()  # scattered, as in a paged cache
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    got = kernels.paged_decode_attention(q, k, v, slots, lengths)
    for b in range(B):
        n = int(lengths[b])
        kb, vb = k[slots[b, :n]].double(), v[slots[b, :n]].double()  # (n, H, D)
        w = torch.softmax(torch.einsum("hd,shd->hs", q[b].double(), kb), dim=-1)
        want = torch.einsum("hs,shd->hd", w, vb)
        assert torch.allclose(got[b].double(), want, atol=1e-5), (b, n)


@needs_kernels
def test_paged_decode_attention_refuses_bad_input():
    q, k = torch.randn(2, 2, 8), torch.randn(10, 2, 8)
    slots, lengths = torch.zeros(2, 4, dtype=torch.long), torch.tensor([1, 4])
    with pytest.raises(ValueError, match=r"lengths must be int64 and lie in \[1, 4\]"):
        kernels.paged_decode_attention(q, k, k, slots, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 10\)"):
        kernels.paged_decode_attention(q, k, k, slots + 10, lengths)
    with pytest.raises(TypeError, match="float32"):
        kernels.paged_decode_attention(q.double(), k, k, slots, lengths)
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.paged_decode_attention(q, torch.randn(10, 3, 8), torch.randn(10, 3, 8), slots, lengths)
