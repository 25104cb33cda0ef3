"""The CPU inference kernels (varctl/models/kernels.py): oneDNN linear layers and the decoder's Winograd
convolutions agree with the plain ops, are used only where no gradient is needed, and switch off with
torch's own backend flags."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varctl.models import kernels
from varctl.models.kernels import DecoderConv2d, Linear, linear
from varctl.models.vae_blocks import Decoder


def _calls(monkeypatch, name: str) -> list:
    """Count the calls of a kernels.py fast path (the op is wrapped, not replaced)."""
    calls = []
    if name == "linear":
        op = kernels._ONEDNN_LINEAR
        if op is None:
            pytest.skip("oneDNN is not available in this torch build")

        def spy(*args):
            calls.append(args[0].shape)
            return op(*args)

        monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", spy)
    else:
        if not torch.backends.nnpack.is_available():
            pytest.skip("NNPACK is not available in this torch build")
        op = torch._nnpack_spatial_convolution

        def spy(x, *args):
            calls.append(tuple(x.shape))
            return op(x, *args)

        monkeypatch.setattr(torch, "_nnpack_spatial_convolution", spy)
    return calls


@pytest.mark.parametrize("shape", [(2, 64), (3, 5, 64), (1, 0, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_without_grad(monkeypatch, shape, bias):
    calls = _calls(monkeypatch, "linear")
    torch.manual_seed(0)
    layer = Linear(64, 48, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        ours = layer(x)
    assert calls == [x.shape]  # the oneDNN op ran
    torch.testing.assert_close(ours, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert ours.shape == (*shape[:-1], 48)


def test_linear_with_grad_uses_f_linear_and_trains(monkeypatch):
    calls = _calls(monkeypatch, "linear")
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    layer(x).square().sum().backward()
    assert calls == [] and layer.weight.grad is not None
    expected = 2 * F.linear(x, layer.weight, layer.bias).t() @ x
    torch.testing.assert_close(layer.weight.grad, expected)


def test_linear_off_under_autocast_and_the_mkldnn_flag(monkeypatch):
    calls = _calls(monkeypatch, "linear")
    w = torch.randn(8, 16)
    x = torch.randn(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w).dtype == torch.bfloat16  # autocast's cast, which only F.linear knows
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(linear(x, w), F.linear(x, w))
    with torch.no_grad():
        assert linear(x.double(), w.double()).dtype == torch.float64
    assert calls == []


def test_the_state_dict_is_nn_linear_s():
    layer, plain = Linear(4, 3), nn.Linear(4, 3)
    assert list(layer.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(layer.state_dict())


@pytest.mark.parametrize("batch", [1, 3])
def test_winograd_convolution_matches_the_direct_one(monkeypatch, batch):
    calls = _calls(monkeypatch, "conv")
    torch.manual_seed(0)
    conv = DecoderConv2d(8, 16, 3, padding=1)
    x = torch.randn(batch, 8, 64, 64)
    with torch.no_grad():
        ours = conv(x)
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert calls == [(1, 8, 64, 64)] * batch  # NNPACK's inference path, one image at a time
    err = (ours.double() - exact).abs().max().item()
    assert 0 < err < 1e-4 * exact.abs().max().item()  # Winograd's rounding: not bitwise, well within 1e-4


def test_winograd_only_for_large_maps_3x3_and_no_grad(monkeypatch):
    calls = _calls(monkeypatch, "conv")
    torch.manual_seed(0)
    conv = DecoderConv2d(4, 4, 3, padding=1)
    small = torch.randn(1, 4, 32, 32)  # below WINOGRAD_MIN_PIXELS: direct
    large = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        assert torch.equal(conv(small), F.conv2d(small, conv.weight, conv.bias, padding=1))
        strided = DecoderConv2d(4, 4, 3, padding=1, stride=2)
        assert torch.equal(strided(large), F.conv2d(large, strided.weight, strided.bias, padding=1, stride=2))
        with torch.backends.nnpack.flags(enabled=False):
            assert torch.equal(conv(large), F.conv2d(large, conv.weight, conv.bias, padding=1))
    assert calls == []
    out = conv(large)  # with grad: the direct convolution, whose backward exists
    assert calls == [] and out.grad_fn is not None
    with torch.no_grad():
        conv(large)
    assert calls == [(1, 4, 64, 64)]


def test_decoder_at_inference_matches_its_direct_decode():
    torch.manual_seed(0)
    decoder = Decoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, groups=8).eval()
    z = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        ours = decoder(z)
        with torch.backends.nnpack.flags(enabled=False):
            direct = decoder(z)
    torch.testing.assert_close(ours, direct, atol=1e-4, rtol=0)
    assert not torch.equal(ours, direct) or not torch.backends.nnpack.is_available()


def test_decoder_at_inference_decodes_image_by_image(monkeypatch):
    """A batch is decoded one image at a time where NNPACK runs (no conv output copied into a batch): the
    same images as each image decoded alone, bit for bit, and the training path keeps the batch."""
    torch.manual_seed(0)
    decoder = Decoder(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, groups=8).eval()
    z = torch.randn(3, 4, 32, 32)
    batches = []
    monkeypatch.setattr(decoder, "_decode", lambda z, f=decoder._decode: batches.append(len(z)) or f(z))
    with torch.no_grad():
        decoder(z)  # 64 px images: below IMAGE_BY_IMAGE_MIN_PIXELS, small maps run better batched
    assert batches == [3]
    batches.clear()
    monkeypatch.setattr(kernels, "IMAGE_BY_IMAGE_MIN_PIXELS", 64 * 64)
    with torch.no_grad():
        ours = decoder(z)
        alone = torch.cat([decoder(z[i : i + 1]) for i in range(3)])
    assert torch.equal(ours, alone)
    if torch.backends.nnpack.is_available():
        assert batches == [1, 1, 1] + [1, 1, 1]
    batches.clear()
    with torch.no_grad(), torch.backends.nnpack.flags(enabled=False):
        direct = decoder(z)  # without NNPACK the batch stays whole
    assert batches == [3]
    torch.testing.assert_close(ours, direct, atol=1e-4, rtol=0)
    batches.clear()
    trained = decoder(z.requires_grad_())
    assert batches == [3] and trained.grad_fn is not None
    torch.testing.assert_close(trained.detach(), direct, atol=1e-5, rtol=0)


def test_resnet_block_adds_its_skip_in_place_with_the_same_values_and_gradients():
    from varctl.models.vae_blocks import ResnetBlock

    torch.manual_seed(0)
    for c_in, c_out in ((8, 8), (8, 16)):
        block = ResnetBlock(c_in, c_out, groups=4)
        x = torch.randn(2, c_in, 8, 8, requires_grad=True)
        out = block(x)

        h = block.conv1(F.silu(block.norm1(x)))
        h = block.conv2(F.silu(block.norm2(h)))
        ref = block.nin_shortcut(x) + h  # the out-of-place sum, in the official order
        assert torch.equal(out, ref)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
        assert torch.equal(g, g_ref)


def test_ffn_gelu_in_place_at_inference_only():
    from varctl.models.transformer import FFN

    torch.manual_seed(0)
    ffn = FFN(16, 64)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # in place, the same values
        assert torch.equal(ffn(x), ffn.fc2(F.gelu(ffn.fc1(x), approximate="tanh")))
    reference = ffn.fc2(F.gelu(ffn.fc1(x), approximate="tanh"))
    out = ffn(x)  # with grad: the module GELU, whose backward needs its input
    assert torch.equal(out, reference)
    (g,) = torch.autograd.grad(out.sum(), ffn.fc1.weight)
    (g_ref,) = torch.autograd.grad(reference.sum(), ffn.fc1.weight)
    assert torch.equal(g, g_ref)


def test_linear_rows_beyond_the_cpus_limit_go_to_f_linear(monkeypatch):
    calls = _calls(monkeypatch, "linear")
    monkeypatch.setattr(kernels, "ONEDNN_MAX_ROWS", 6)
    torch.manual_seed(0)
    layer = Linear(8, 4)
    few, many = torch.randn(2, 3, 8), torch.randn(7, 8)
    with torch.no_grad():
        layer(few)
        assert calls == [few.shape]  # 6 rows: oneDNN
        assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))  # 7: MKL's F.linear
    assert calls == [few.shape]
    for capability, limit in (("AVX2", kernels.ONEDNN_MAX_ROWS_AVX2), ("AVX512", None), ("DEFAULT", None)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert kernels.onednn_max_rows() == limit  # measured: AVX2 only (the module docstring)


def test_resnet_block_keeps_the_promoted_dtype_of_a_mixed_sum():
    from varctl.models.vae_blocks import ResnetBlock

    class ToFloat(nn.Module):
        def forward(self, x):
            return x.float()

    torch.manual_seed(0)
    block = ResnetBlock(8, 8, groups=4).to(torch.bfloat16)
    block.nin_shortcut = ToFloat()  # a float32 skip beside bfloat16 convolutions: the sum is float32
    x = torch.randn(1, 8, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        h = block.conv2(F.silu(block.norm2(block.conv1(F.silu(block.norm1(x))))))
        out = block(x)
    assert out.dtype == torch.float32 and torch.equal(out, x.float() + h)
