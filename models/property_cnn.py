"""The Property Score CNN (SPEC D): six small CNNs, each scoring one property on a fixed crop.

The chat product never runs it; it is the offline tool that named the face groups and tested the
change vectors, kept here so that generated faces can be measured the way upstream measured them.
Module names and order reproduce the published checkpoint `stylegan_gen_fine_tuned_v2_cnn.pth`
(`property_cnn_state_dict.json`) so it loads strictly. Scoring always runs in eval mode: upstream
left dropout on (SPEC F.7), which only added noise to its own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.stylegan import CheckpointError, read_checkpoint

IMAGE_SIZE = 256
HIDDEN_FEATURES = 256
CONV_DROPOUT = 0.05
FC_DROPOUT = 0.45

# Stage plan of a branch: an int is a 3×3 conv (no padding) with that many output channels,
# "pool" a 2×2 max-pool.
Stage = int | str


@dataclass(frozen=True)
class BranchSpec:
    name: str  # state-dict prefix
    rows: tuple[int, int]  # half-open crop, pixels
    cols: tuple[int, int]
    stages: tuple[Stage, ...]
    outputs: int = 1


_FOUR_CONVS = (32, 64, "pool", 64, "pool", 128, "pool")
_SIX_CONVS = (32, 64, "pool", 64, "pool", 128, "pool", 128, "pool", 128)

# In checkpoint order (which is not the output order).
BRANCHES: tuple[BranchSpec, ...] = (
    BranchSpec("eyes_score_cnn", (96, 144), (64, 192), _FOUR_CONVS),
    BranchSpec("mouth_score_cnn", (160, 208), (96, 160), _FOUR_CONVS),
    BranchSpec("pose_score_cnn", (112, 160), (88, 168), (32, 64, "pool", 64, "pool", 128, 128)),
    BranchSpec("hair_color_score_cnn", (0, 256), (0, 256), (*_SIX_CONVS, "pool")),
    BranchSpec("hair_length_score_cnn", (128, 256), (0, 256), _SIX_CONVS),
    BranchSpec("background_score_cnn", (0, 128), (0, 256), _SIX_CONVS, outputs=2),
)
OUTPUT_ORDER = (
    "eyes_score_cnn",
    "hair_color_score_cnn",
    "hair_length_score_cnn",
    "mouth_score_cnn",
    "pose_score_cnn",
    "background_score_cnn",
)


class ScoreBranch(nn.Module):
    """Crop → convs (LeakyReLU 0.01, Dropout2d) and pools → Linear → tanh → Dropout → Linear."""

    def __init__(self, spec: BranchSpec):
        super().__init__()
        self.spec = spec
        channels = 3
        height = spec.rows[1] - spec.rows[0]
        width = spec.cols[1] - spec.cols[0]
        self.stage_names: list[str] = []  # forward order
        convs = pools = 0
        for stage in spec.stages:
            module: nn.Module
            if stage == "pool":
                pools += 1
                name, module = f"pool{pools}", nn.MaxPool2d(2, 2)
                height, width = height // 2, width // 2
            else:
                assert isinstance(stage, int)
                convs += 1
                name = f"conv{convs}"
                module = nn.Sequential(
                    nn.Conv2d(channels, stage, kernel_size=3),
                    nn.LeakyReLU(),
                    nn.Dropout2d(CONV_DROPOUT),
                )
                channels, height, width = stage, height - 2, width - 2
            self.add_module(name, module)
            self.stage_names.append(name)
        self.flatten_size = channels * height * width
        self.fc1 = nn.Sequential(nn.Linear(self.flatten_size, HIDDEN_FEATURES), nn.Tanh(), nn.Dropout(FC_DROPOUT))
        self.fc_final = nn.Linear(HIDDEN_FEATURES, spec.outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 256, 256) → (B, outputs)."""
        (top, bottom), (left, right) = self.spec.rows, self.spec.cols
        x = images[:, :, top:bottom, left:right]
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc_final(self.fc1(x.flatten(start_dim=1)))  # row-major (C, H, W) flatten


class PropertyScoreCNN(nn.Module):
    """(B, 3, 256, 256) in [-1, 1] → (B, 7): eyes, hair_color, hair_length, mouth, pose,
    background_mean, background_std."""

    def __init__(self) -> None:
        super().__init__()
        for spec in BRANCHES:
            self.add_module(spec.name, ScoreBranch(spec))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"the CNN needs {IMAGE_SIZE}×{IMAGE_SIZE} images, got {images.shape}")
        return torch.cat([getattr(self, name)(images) for name in OUTPUT_ORDER], dim=1)


@dataclass(frozen=True)
class PropertyScores:
    eyes: float
    hair_color: float
    hair_length: float
    mouth: float
    pose: float
    background_mean: float
    background_std: float


def preprocess(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) or (B, H, W, 3) → float32 (B, 3, H, W): ÷255, −0.5, ÷0.5 (SPEC D)."""
    if images_uint8.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images, got {images_uint8.dtype}")
    batch = images_uint8[np.newaxis] if images_uint8.ndim == 3 else images_uint8
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) or (B, H, W, 3) images, got {images_uint8.shape}")
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return (x / 255 - 0.5) / 0.5


@torch.inference_mode()
def measure(cnn: PropertyScoreCNN, image_uint8: np.ndarray) -> PropertyScores:
    """Score one (256, 256, 3) RGB image, dropout off."""
    if image_uint8.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected one {IMAGE_SIZE}² RGB image, got {image_uint8.shape}")
    cnn.eval()
    device = next(cnn.parameters()).device
    scores = cnn(preprocess(image_uint8).to(device))[0].tolist()
    return PropertyScores(*scores)


def load_property_cnn(path: Path, *, device: str | torch.device = "cpu") -> PropertyScoreCNN:
    """Strictly load a checkpoint (float16 files are upcast exactly); returned in eval mode."""
    path = Path(path)
    state = read_checkpoint(path, "property CNN")
    with torch.device("meta"):
        cnn = PropertyScoreCNN()
    try:
        cnn.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"property CNN checkpoint {path} does not fit: {error}") from error
    return cnn.requires_grad_(False).eval().to(device)
