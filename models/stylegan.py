"""The StyleGAN-VectorFind-v7 face generator (SPEC A): a StyleGAN-1 generator, genforce style, whose
mapping network also takes a 3-value "label".

The module tree reproduces the published checkpoint `stylegan_gen_vector_find_v7.pth` exactly —
names, registration order, shapes and the parameter/buffer split — so it loads with `strict=True`.
Weights are stored unscaled ("equalized learning rate"): every layer multiplies its stored tensor by
a constant at run time, in float32, the way the original does, which keeps outputs within float32
noise of the golden fixtures. Only inference is supported; nothing here trains.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ModelFilesMissing

LEAKY_RELU_SLOPE = 0.2
PIXEL_NORM_EPS = 1e-8
INSTANCE_NORM_EPS = 1e-8
CONV_GAIN = math.sqrt(2.0)  # He gain for layers followed by a LeakyReLU
BLUR_TAPS = (1.0, 2.0, 1.0)


class CheckpointError(RuntimeError):
    """A checkpoint exists but does not fit the architecture (or cannot be read)."""


@dataclass(frozen=True)
class GeneratorConfig:
    """Constructor arguments of the upstream generator; the defaults are the published model's.

    Golden fixtures and the tiny stand-in change only `resolution`, `fmaps_base` and `fmaps_max`.
    """

    resolution: int = 256
    z_dim: int = 512
    label_dim: int = 3
    label_embedding_dim: int = 16
    w_dim: int = 512
    mapping_layers: int = 8
    mapping_fmaps: int = 512
    mapping_lr_mul: float = 0.01
    fmaps_base: int = 16384
    fmaps_max: int = 512
    init_resolution: int = 4
    fused_scale_min_resolution: int = 128
    image_channels: int = 3

    def __post_init__(self) -> None:
        ratio = self.resolution // self.init_resolution
        if ratio < 1 or self.resolution % self.init_resolution or ratio & (ratio - 1):
            raise ValueError(
                f"resolution {self.resolution} must be init_resolution ({self.init_resolution}) times a power of two"
            )
        if self.channels(self.resolution) < 1:
            raise ValueError(f"fmaps_base {self.fmaps_base} leaves no channels at resolution {self.resolution}")

    @property
    def num_blocks(self) -> int:
        """One block per resolution init_resolution, 2·init_resolution, ..., resolution."""
        return int(math.log2(self.resolution // self.init_resolution)) + 1

    @property
    def num_layers(self) -> int:
        """Style layers (two per block) = the number of per-layer w codes."""
        return 2 * self.num_blocks

    def block_resolution(self, block: int) -> int:
        return self.init_resolution * 2**block

    def channels(self, resolution: int) -> int:
        return min(self.fmaps_base // resolution, self.fmaps_max)

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> GeneratorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown generator config keys: {unknown}")
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def for_checkpoint(cls, checkpoint: Path) -> GeneratorConfig:
        """The sidecar config of a reduced-size checkpoint, or the published model's defaults."""
        sidecar = config_path(checkpoint)
        if not sidecar.is_file():
            return cls()
        try:
            return cls.from_dict(json.loads(sidecar.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"invalid generator config {sidecar}: {error}") from error


def config_path(checkpoint: Path) -> Path:
    """Where a non-default checkpoint records its GeneratorConfig (the real one has none)."""
    return checkpoint.with_suffix(".config.json")


# --------------------------------------------------------------------------------------------
# Building blocks


class EqualizedLinear(nn.Module):
    """y = x·(W·weight_gain)ᵀ + b·bias_gain with W, b stored unscaled (SPEC A.3)."""

    def __init__(self, in_features: int, out_features: int, *, gain: float, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.weight_gain = gain / math.sqrt(in_features) * lr_mul
        self.bias_gain = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)


class NoiseInjection(nn.Module):
    """Adds the stored noise map, scaled per channel (randomize_noise=False: deterministic)."""

    noise: torch.Tensor

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels))
        self.register_buffer("noise", torch.randn(1, 1, resolution, resolution))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.noise * self.weight.view(1, -1, 1, 1)


def blur_kernel(channels: int) -> torch.Tensor:
    """The stored `blur.kernel` buffer: [1,2,1]ᵀ[1,2,1]/16 once per channel, (C, 1, 3, 3)."""
    taps = torch.tensor(BLUR_TAPS)
    kernel = torch.outer(taps, taps)
    return (kernel / kernel.sum()).expand(channels, 1, 3, 3).clone()


class Blur(nn.Module):
    """Depthwise low-pass filter after every upsampling conv (SPEC A.6.4)."""

    kernel: torch.Tensor

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("kernel", blur_kernel(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, padding=1, groups=x.shape[1])


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(torch.mean(x**2, dim=1, keepdim=True) + PIXEL_NORM_EPS)


def instance_norm(x: torch.Tensor) -> torch.Tensor:
    """Per sample and channel over H, W; biased variance, no affine (SPEC A.6.1 step 5)."""
    x = x - torch.mean(x, dim=(2, 3), keepdim=True)
    return x / torch.sqrt(torch.mean(x**2, dim=(2, 3), keepdim=True) + INSTANCE_NORM_EPS)


def fused_upsample_kernel(weight: torch.Tensor) -> torch.Tensor:
    """3×3 conv weight (C_out, C_in, 3, 3) → 4×4 transposed-conv kernel (C_in, C_out, 4, 4).

    Summing the four shifted copies of the zero-padded kernel makes one stride-2 transposed conv
    equal to "nearest ×2 upsample, then 3×3 conv" up to border handling (SPEC A.6.3).
    """
    padded = F.pad(weight.permute(1, 0, 2, 3), (1, 1, 1, 1))  # (C_in, C_out, 5, 5)
    return padded[:, :, :-1, :-1] + padded[:, :, 1:, :-1] + padded[:, :, :-1, 1:] + padded[:, :, 1:, 1:]


# --------------------------------------------------------------------------------------------
# Mapping and truncation


class MappingOutput(NamedTuple):
    w: torch.Tensor  # (B, w_dim)
    z_normalized: torch.Tensor  # (B, z_dim + label_embedding_dim), the input of dense0
    label_embedding: torch.Tensor  # (B, label_embedding_dim)


class MappingNetwork(nn.Module):
    """(z, label) → w: embed the label, pixel-normalise the concat, 8 × (dense, LeakyReLU) (A.4)."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.label_weight = nn.Parameter(torch.randn(config.label_dim, config.label_embedding_dim))
        in_features = config.z_dim + config.label_embedding_dim
        for k in range(config.mapping_layers):
            last = k == config.mapping_layers - 1
            out_features = config.w_dim if last else config.mapping_fmaps
            dense = EqualizedLinear(in_features, out_features, gain=CONV_GAIN, lr_mul=config.mapping_lr_mul)
            self.add_module(f"dense{k}", dense)
            in_features = out_features
        self.num_dense = config.mapping_layers

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> MappingOutput:
        embedding = torch.matmul(label, self.label_weight)  # (B, 16)
        x = pixel_norm(torch.cat((z, embedding), dim=1))  # (B, 528): z first, then the embedding
        normalized = x
        for k in range(self.num_dense):
            x = F.leaky_relu(getattr(self, f"dense{k}")(x), LEAKY_RELU_SLOPE)
        return MappingOutput(w=x, z_normalized=normalized, label_embedding=embedding)


class Truncation(nn.Module):
    """Repeats w for every style layer; with the product's psi=1 it changes nothing (SPEC A.5)."""

    w_avg: torch.Tensor

    def __init__(self, num_layers: int, w_dim: int):
        super().__init__()
        self.num_layers = num_layers
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, w: torch.Tensor, psi: float = 1.0, layers: int = 0) -> torch.Tensor:
        wp = w.unsqueeze(1).repeat(1, self.num_layers, 1)  # (B, L, w_dim)
        if psi < 1.0 and layers > 0:
            pulled = self.w_avg + (wp[:, :layers] - self.w_avg) * psi
            wp = torch.cat((pulled, wp[:, layers:]), dim=1)
        return wp


# --------------------------------------------------------------------------------------------
# Synthesis

LayerKind = Literal["const", "conv", "nearest_up", "fused_up"]


class SynthesisLayer(nn.Module):
    """One style layer: input stage, noise, bias, LeakyReLU, instance norm, style (SPEC A.6.1).

    Registration order (bias before weight/const, then noise, style, blur) is the checkpoint's.
    """

    def __init__(self, kind: LayerKind, in_channels: int, out_channels: int, resolution: int, w_dim: int):
        super().__init__()
        self.kind = kind
        self.out_channels = out_channels
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if kind == "const":
            self.const = nn.Parameter(torch.ones(1, out_channels, resolution, resolution))
        else:
            self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
            self.weight_gain = CONV_GAIN / math.sqrt(in_channels * 9)
        self.apply_noise = NoiseInjection(out_channels, resolution)
        self.style = EqualizedLinear(w_dim, 2 * out_channels, gain=1.0)
        self.blur = Blur(out_channels) if kind in ("nearest_up", "fused_up") else None

    def forward(self, x: torch.Tensor | None, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C_in, r/2 or r, ·) or None for the constant layer; w (B, w_dim).

        Returns the activations (B, C, r, r) and the style (B, 2C).
        """
        if self.kind == "const":
            x = self.const.expand(w.shape[0], -1, -1, -1)  # (B, C, 4, 4)
        else:
            assert x is not None
            weight = self.weight * self.weight_gain
            if self.kind == "nearest_up":
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C_in, r, r)
                x = F.conv2d(x, weight, padding=1)
            elif self.kind == "fused_up":
                kernel = fused_upsample_kernel(weight)
                x = F.conv_transpose2d(x, kernel, stride=2, padding=1)  # (B, C, r, r)
            else:
                x = F.conv2d(x, weight, padding=1)
            if self.blur is not None:
                x = self.blur(x)
        x = self.apply_noise(x)
        x = x + self.bias.view(1, -1, 1, 1)
        x = F.leaky_relu(x, LEAKY_RELU_SLOPE)
        x = instance_norm(x)
        style = self.style(w)  # (B, 2C): scale part, then shift part
        scale, shift = style.view(-1, 2, self.out_channels, 1, 1).unbind(dim=1)
        return x * (scale + 1) + shift, style


class ToRGB(nn.Module):
    """1×1 conv to RGB plus bias, no activation (SPEC A.6.5)."""

    def __init__(self, in_channels: int, image_channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(image_channels))
        self.weight = nn.Parameter(torch.randn(image_channels, in_channels, 1, 1))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.weight_gain) + self.bias.view(1, -1, 1, 1)


class SynthesisOutput(NamedTuple):
    image: torch.Tensor  # (B, 3, H, W) raw, nominal range [-1, 1], not clipped
    styles: tuple[torch.Tensor, ...]  # per layer (B, 2C)


class SynthesisNetwork(nn.Module):
    """wp (B, L, w_dim) → raw image. Blocks double the resolution; only the last toRGB is used."""

    lod: torch.Tensor

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.num_layers = config.num_layers
        self.num_blocks = config.num_blocks
        self.register_buffer("lod", torch.zeros(()))
        previous_channels = 0
        for block in range(config.num_blocks):
            resolution = config.block_resolution(block)
            channels = config.channels(resolution)
            if block == 0:
                first: LayerKind = "const"
            elif resolution >= config.fused_scale_min_resolution:
                first = "fused_up"
            else:
                first = "nearest_up"
            in_channels = channels if block == 0 else previous_channels
            self.add_module(
                f"layer{2 * block}",
                SynthesisLayer(first, in_channels, channels, resolution, config.w_dim),
            )
            self.add_module(
                f"layer{2 * block + 1}",
                SynthesisLayer("conv", channels, channels, resolution, config.w_dim),
            )
            # Every block's toRGB exists for strict loading; with lod 0 only the last one is used.
            self.add_module(f"output{block}", ToRGB(channels, config.image_channels))
            previous_channels = channels

    def layer(self, index: int) -> SynthesisLayer:
        return getattr(self, f"layer{index}")

    def forward(self, wp: torch.Tensor) -> torch.Tensor:
        return self.forward_with_styles(wp).image

    def forward_with_styles(self, wp: torch.Tensor) -> SynthesisOutput:
        lod = float(self.lod)
        if lod != 0.0:
            raise ValueError(f"synthesis.lod is {lod}; only fully grown generators (lod 0) are supported")
        x: torch.Tensor | None = None
        styles = []
        for index in range(self.num_layers):
            x, style = self.layer(index)(x, wp[:, index])
            styles.append(style)
        assert x is not None
        image = getattr(self, f"output{self.num_blocks - 1}")(x)
        return SynthesisOutput(image=image, styles=tuple(styles))


class Generator(nn.Module):
    """mapping → truncation → synthesis; the product calls the three parts directly (SPEC B.3)."""

    def __init__(self, config: GeneratorConfig | None = None):
        super().__init__()
        self.config = config or GeneratorConfig()
        self.mapping = MappingNetwork(self.config)
        self.truncation = Truncation(self.config.num_layers, self.config.w_dim)
        self.synthesis = SynthesisNetwork(self.config)

    def truncate(self, w: torch.Tensor, psi: float = 1.0, layers: int = 0) -> torch.Tensor:
        """(B, w_dim) → (B, L, w_dim)."""
        return self.truncation(w, psi, layers)

    @torch.inference_mode()
    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """z (B, z_dim), label (B, label_dim) → raw image (B, 3, H, W), w unedited."""
        return self.synthesis(self.truncate(self.mapping(z, label).w))


def to_uint8(image_raw: torch.Tensor) -> np.ndarray:
    """Raw (B, 3, H, W) → uint8 (B, H, W, 3) RGB (SPEC A.7).

    In float64: (v + 1)·255/2, then + 0.5, saturate to [0, 255] and truncate — round half up.
    """
    q = (image_raw.detach().to(torch.float64) + 1.0) * 255.0 / 2.0
    pixels = (q + 0.5).clamp_(0.0, 255.0).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def load_generator(
    path: Path,
    config: GeneratorConfig | None = None,
    *,
    device: str | torch.device = "cpu",
) -> Generator:
    """Strictly load a generator checkpoint; `config` defaults to the checkpoint's sidecar (if any).

    The model is built on the meta device and the checkpoint's tensors are assigned to it, so
    loading allocates the weights once and leaves the global RNG untouched.
    """
    path = Path(path)
    if config is None:
        config = GeneratorConfig.for_checkpoint(path)
    state = read_checkpoint(path, "generator")
    with torch.device("meta"):
        generator = Generator(config)
    try:
        generator.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"generator checkpoint {path} does not match {config}: {error}") from error
    return generator.requires_grad_(False).eval().to(device)


def read_checkpoint(path: Path, what: str) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) → float32 tensors, with errors that name the file."""
    if not path.is_file():
        raise ModelFilesMissing([path])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a corrupt file
        raise CheckpointError(f"cannot read {what} checkpoint {path}: {error}") from error
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{what} checkpoint {path} is not a plain state dict of tensors")
    return {name: value.float() if value.is_floating_point() else value for name, value in state.items()}


# --------------------------------------------------------------------------------------------
# Prepared synthesis: the same network with its per-call weight work done once


@dataclass(frozen=True, eq=False)
class _PreparedLayer:
    """One style layer's tensors, ready for `PreparedSynthesis`."""

    kind: LayerKind
    kernel: torch.Tensor
    """Scaled 3×3 conv weight, or the fused 4×4 transposed-conv kernel."""
    blur: torch.Tensor | None
    offset: torch.Tensor
    """noise · strength + bias as one (1, C, r, r) map: both are fixed once the model is loaded."""
    style_weight: torch.Tensor
    style_bias: torch.Tensor
    channels: int


class PreparedSynthesis:
    """`SynthesisNetwork` for inference, with everything that does not depend on w done once.

    The module path rescales every weight, rebuilds the fused upsampling kernels and adds noise
    and bias separately on every call; with the stored noise (randomize_noise=False) and the lod
    fixed at 0 all of that is constant. Here it happens at construction; the first layer's
    normalised activations, a function of the constant alone, are precomputed in float32; noise
    and bias become one stored map per layer; and each layer's instance norm and style modulation
    run as one batch-norm call.

    Convolutions run in `dtype` and channels-last memory, the layout oneDNN convolves in without
    reordering; the norm statistics are accumulated in float32 whatever the dtype. In float32
    the result matches the module path up to float32 rounding. bfloat16 (fast where the CPU has
    AVX512-BF16 or AMX) rounds every convolution input to 8 significant bits, so pixels differ by
    a level or two on average: `models/face.py` makes that an explicit choice.
    """

    def __init__(self, synthesis: SynthesisNetwork, dtype: torch.dtype = torch.float32):
        if float(synthesis.lod) != 0.0:
            raise ValueError(f"synthesis.lod is {float(synthesis.lod)}; only fully grown generators are supported")
        self.dtype = dtype
        with torch.no_grad():
            first = synthesis.layer(0)
            self._first = self._style_affine(first)
            self._first_channels = first.out_channels
            constant = first.const + _noise_and_bias(first)
            self._first_normalized = instance_norm(F.leaky_relu(constant, LEAKY_RELU_SLOPE))  # (1, C, 4, 4)
            self._layers = [self._prepare(synthesis.layer(i), dtype) for i in range(1, synthesis.num_layers)]
            to_rgb = getattr(synthesis, f"output{synthesis.num_blocks - 1}")
            self._rgb_weight = _channels_last(to_rgb.weight * to_rgb.weight_gain, dtype)
            self._rgb_bias = to_rgb.bias.detach().clone().view(1, -1, 1, 1)

    @staticmethod
    def _style_affine(layer: SynthesisLayer) -> tuple[torch.Tensor, torch.Tensor]:
        weight = layer.style.weight * layer.style.weight_gain
        return weight.detach().clone(), (layer.style.bias * layer.style.bias_gain).detach().clone()

    @classmethod
    def _prepare(cls, layer: SynthesisLayer, dtype: torch.dtype) -> _PreparedLayer:
        kernel = layer.weight * layer.weight_gain
        if layer.kind == "fused_up":
            kernel = fused_upsample_kernel(kernel)
        style_weight, style_bias = cls._style_affine(layer)
        return _PreparedLayer(
            kind=layer.kind,
            kernel=_channels_last(kernel, dtype),
            blur=_channels_last(layer.blur.kernel, dtype) if layer.blur is not None else None,
            offset=_channels_last(_noise_and_bias(layer), dtype),
            style_weight=style_weight,
            style_bias=style_bias,
            channels=layer.out_channels,
        )

    @torch.inference_mode()
    def __call__(self, wp: torch.Tensor) -> torch.Tensor:
        """wp (B, L, w_dim) float32 → raw image (B, 3, H, W) float32, like `SynthesisNetwork`.

        Frames are synthesised one at a time: on a few CPU cores a batch is no faster per frame,
        and one sample lets the norm and modulation run as a single batch-norm call.
        """
        return torch.cat([self._one(wp[i : i + 1]) for i in range(wp.shape[0])])

    def _one(self, wp: torch.Tensor) -> torch.Tensor:
        """(1, L, w_dim) → (1, 3, H, W)."""
        scale, shift = _scale_and_shift(wp[:, 0], *self._first, self._first_channels)
        x = _channels_last(self._first_normalized * (scale + 1) + shift, self.dtype)  # (1, C, 4, 4)
        for index, layer in enumerate(self._layers, start=1):
            if layer.kind == "nearest_up":
                x = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), layer.kernel, padding=1)
            elif layer.kind == "fused_up":
                x = F.conv_transpose2d(x, layer.kernel, stride=2, padding=1)
            else:
                x = F.conv2d(x, layer.kernel, padding=1)
            if layer.blur is not None:
                x = F.conv2d(x, layer.blur, padding=1, groups=layer.channels)
            x = F.leaky_relu_(x.add_(layer.offset), LEAKY_RELU_SLOPE)
            # Instance norm of one sample is batch norm with batch statistics; its affine step is
            # the style modulation x·(1 + s) + t. One vectorised pass instead of four.
            scale, shift = _scale_and_shift(wp[:, index], layer.style_weight, layer.style_bias, layer.channels)
            x = F.batch_norm(
                x,
                None,
                None,
                weight=(scale + 1).view(-1).to(self.dtype),
                bias=shift.reshape(-1).to(self.dtype),
                training=True,
                eps=INSTANCE_NORM_EPS,
            )
        image = F.conv2d(x, self._rgb_weight).float() + self._rgb_bias
        return image.contiguous()


def _noise_and_bias(layer: SynthesisLayer) -> torch.Tensor:
    noise = layer.apply_noise
    return noise.noise * noise.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)  # (1, C, r, r)


def _scale_and_shift(
    w: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The style affine of SPEC A.6.1 step 6, split into its (B, C, 1, 1) scale and shift parts."""
    style = F.linear(w, weight, bias)  # (B, 2C)
    scale, shift = style.view(-1, 2, channels, 1, 1).unbind(dim=1)
    return scale, shift


def _channels_last(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to(dtype).contiguous(memory_format=torch.channels_last)
