"""Where every checkpoint and data file lives on disk: the original project's layout.

A user who already laid the files out as the original describes points `OHLORA_MODELS_DIR` at
that folder; the tiny stand-ins use the same layout so the same loading code runs on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.types import Task

TASKS: tuple[Task, ...] = tuple(Task)


@dataclass(frozen=True)
class ModelLayout:
    root: Path

    @property
    def llm_dir(self) -> Path:
        return self.root / "llm" / "models"

    def adapter_dir(self, task: Task) -> Path:
        return self.llm_dir / f"polyglot_{task.value}_fine_tuned"

    @property
    def base_model_dir(self) -> Path:
        """The base model, loaded from this local folder (`ohlora download` puts Polyglot-Ko 1.3B here)."""
        return self.llm_dir / "polyglot_original"

    @property
    def sbert_dir(self) -> Path:
        return self.llm_dir / "memory_sbert" / "trained_sbert_model"

    @property
    def stylegan_models_dir(self) -> Path:
        return self.root / "stylegan" / "models"

    @property
    def generator_path(self) -> Path:
        return self.stylegan_models_dir / "stylegan_gen_vector_find_v7.pth"

    @property
    def property_cnn_path(self) -> Path:
        return self.stylegan_models_dir / "stylegan_gen_fine_tuned_v2_cnn.pth"

    @property
    def vectorfind_dir(self) -> Path:
        return self.root / "stylegan" / "stylegan_vectorfind_v7"

    @property
    def z_vectors_csv(self) -> Path:
        return self.vectorfind_dir / "ohlora_z_vectors.csv"

    @property
    def group_names_csv(self) -> Path:
        return self.vectorfind_dir / "ohlora_w_group_names.csv"

    @property
    def property_vectors_dir(self) -> Path:
        return self.vectorfind_dir / "property_score_vectors"

    def change_vector_csv(self, prop: str, group: str) -> Path:
        """prop is eyes, mouth or pose; group one of hhh ... lll."""
        return self.property_vectors_dir / f"{prop}_change_w_vector_{group}.csv"
