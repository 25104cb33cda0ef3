"""The transformer's Linear layers on the CPU: float32 inference through oneDNN rather than MKL's sgemm.

PyTorch runs a float32 ``F.linear`` on the CPU as an MKL sgemm, while its convolutions (and bfloat16
matmuls) already go through oneDNN. On the 2-core AMD EPYC (Zen 4) varctl is benchmarked on, oneDNN's
float32 matmul is 1.3x faster at VAR-d16's full-scale shapes and 2-3x faster at the few-token matmuls of the
first scales, which MKL runs far below the machine's peak (``tools/bench_sample.py`` prints the effect, with
the official code beside). On a 2-core AMD EPYC with AVX2 only, oneDNN is 1.3-1.7x faster than MKL at 8-32
rows but 5-20 % slower from a few hundred rows on (d16's last scales: 800-2048 rows at batch 4 with
guidance): there products of more than ``ONEDNN_MAX_ROWS_AVX2`` rows go to MKL. Both compute the same
products and sums; only the summation order differs, so results agree to float32 rounding (relative ~1e-6):
the parity tests hold either way.

The oneDNN op is the one TorchInductor emits for CPU linear layers (``torch.ops.mkldnn._linear_pointwise``);
it has no backward, so it is used only where no gradient is needed, never under autocast (whose casts
belong to ``F.linear``) and never inside ``torch.compile`` (inductor chooses its own kernels).
``torch.backends.mkldnn.flags(enabled=False)`` switches it off.

The VQVAE decoder's 3x3 convolutions on large maps (64 x 64 and up: 90 % of a 256 px decode) run through
NNPACK's Winograd convolution, one image at a time, which PyTorch ships but picks only for batches of 16 and
more: 2-2.8x faster than oneDNN's direct convolution on the CPU above. Winograd trades multiplications for
additions, so its rounding error is larger: a d16-shaped decode differs from the float64 result by < 1e-4 in
[-1, 1] (direct: < 1e-5; a uint8 step is 8e-3), as cuDNN's Winograd algorithms do on GPUs. Only images are
decoded this way (never tokens: the encoder keeps the direct convolution, so token indices stay exact).
``torch.backends.nnpack.flags(enabled=False)`` switches it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)
# On an AVX2 CPU (no AVX-512) oneDNN wins only on products of few rows (module docstring): larger ones go to
# MKL. Measured at d16 sampling at batch 4 (transformer alone, medians of 4): all through oneDNN 22.3 s,
# oneDNN up to 64 rows 18.5 s, up to 256 rows 17.3 s.
ONEDNN_MAX_ROWS_AVX2 = 256


def onednn_max_rows() -> int | None:
    """The most rows a float32 product on this CPU goes through oneDNN with (None: any number)."""
    return ONEDNN_MAX_ROWS_AVX2 if torch.backends.cpu.get_cpu_capability() == "AVX2" else None


ONEDNN_MAX_ROWS = onednn_max_rows()


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN_LINEAR is not None
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()  # inductor picks its own kernels (this op wants frozen weights)
        and (ONEDNN_MAX_ROWS is None or x.numel() <= ONEDNN_MAX_ROWS * x.shape[-1])
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN for float32 CPU inference."""
    if _onednn(x, weight):
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state_dict keys) whose forward is ``linear`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


WINOGRAD_MIN_PIXELS = 64 * 64  # below it, oneDNN's direct convolution is as fast or faster (measured)


def _nnpack_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        torch._C._get_nnpack_enabled()
        and torch.backends.nnpack.is_available()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


# Decoded images of at least this many pixels are decoded one at a time (``image_by_image``). Measured on a
# 2-core AVX2 EPYC, batch 4: 256 px 1.16-1.19x faster one at a time, 128 px 0.88-1.06x, and the demo's 64 px
# tokenizer (batch 16) 0.4x: its small maps run better batched.
IMAGE_BY_IMAGE_MIN_PIXELS = 256 * 256


def image_by_image(x: torch.Tensor, weight: torch.Tensor, out_pixels: int) -> bool:
    """Whether a decoder given the batch ``x`` (and a weight of its, for the gradient check), decoding images
    of ``out_pixels`` pixels, should run one image at a time: where its large convolutions go through
    NNPACK, which takes one image per call. Decoded whole, each of those outputs is copied into a batch, and
    a 256 px batch's maps (40 MiB an image) are fresh memory the copy faults in."""
    return len(x) > 1 and out_pixels >= IMAGE_BY_IMAGE_MIN_PIXELS and _nnpack_inference(x, weight)


def _winograd(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (
        _nnpack_inference(x, conv.weight)
        and x.shape[-2] * x.shape[-1] >= WINOGRAD_MIN_PIXELS
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class DecoderConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state_dict keys) whose no-grad float32 3x3 convolutions on large
    CPU maps run through NNPACK's Winograd algorithm (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _winograd(self, x):
            return super().forward(x)
        # batch 1 is NNPACK's inference path (Winograd); larger batches would take its slower training path
        x = x.contiguous()
        if len(x) == 1:
            return torch._nnpack_spatial_convolution(x, self.weight, self.bias, [1, 1])
        out = x.new_empty(len(x), self.out_channels, *x.shape[-2:])  # filled image by image, no concatenation
        for i in range(len(x)):
            out[i : i + 1] = torch._nnpack_spatial_convolution(x[i : i + 1], self.weight, self.bias, [1, 1])
        return out
