"""Every setting of the service, read once in the composition root and passed down.

Values come from the environment and `.env` (see `.env.example`); tests build `Settings(...)`
directly. Tokens are `SecretStr` so that a stray log line or repr never shows them.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

STALL_MARGIN_S = 30.0
"""How much longer than a turn one model call may run before the worker gives up on it."""


class ModelProfile(str, Enum):
    REAL = "real"
    TINY = "tiny"


class LlmBackend(str, Enum):
    LOCAL = "local"
    VLLM = "vllm"


Switch = Literal["auto", "on", "off"]
FacePrecision = Literal["auto", "exact", "float32", "bfloat16"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        populate_by_name=True,
    )

    discord_token: SecretStr | None = Field(default=None, validation_alias="DISCORD_TOKEN")
    discord_dev_guild_id: int | None = Field(default=None, validation_alias="DISCORD_DEV_GUILD_ID")
    telegram_token: SecretStr | None = Field(default=None, validation_alias="TELEGRAM_TOKEN")
    telegram_api_base_url: str = Field(default="https://api.telegram.org/bot", validation_alias="TELEGRAM_API_BASE_URL")
    admin_ids: Annotated[frozenset[str], NoDecode] = Field(default=frozenset(), validation_alias="OHLORA_ADMIN_IDS")

    model_profile: ModelProfile = Field(default=ModelProfile.REAL, validation_alias="OHLORA_MODEL_PROFILE")
    db_path: Path = Field(default=Path("data/ohlora.sqlite3"), validation_alias="OHLORA_DB_PATH")
    models_dir: Path = Field(default=Path("data/models"), validation_alias="OHLORA_MODELS_DIR")
    tiny_models_dir: Path = Field(default=Path("data/tiny_models"), validation_alias="OHLORA_TINY_MODELS_DIR")
    llm_backend: LlmBackend = Field(default=LlmBackend.LOCAL, validation_alias="OHLORA_LLM_BACKEND")
    vllm_url: str | None = Field(default=None, validation_alias="OHLORA_VLLM_URL")
    vllm_api_key: SecretStr | None = Field(default=None, validation_alias="OHLORA_VLLM_API_KEY")
    vllm_timeout_s: float = Field(default=60.0, gt=0, validation_alias="OHLORA_VLLM_TIMEOUT_S")
    device: str = Field(default="auto", validation_alias="OHLORA_DEVICE")
    dtype: str = Field(default="auto", validation_alias="OHLORA_DTYPE")
    llm_int8: Switch = Field(default="auto", validation_alias="OHLORA_LLM_INT8")
    face_precision: FacePrecision = Field(default="auto", validation_alias="OHLORA_FACE_PRECISION")
    face: str = Field(default="random", validation_alias="OHLORA_FACE")
    animate_faces: bool = Field(default=False, validation_alias="OHLORA_ANIMATE")

    max_prompt_tokens: int = Field(default=48, ge=1, validation_alias="OHLORA_MAX_PROMPT_TOKENS")
    queue_size: int = Field(default=32, ge=1, validation_alias="OHLORA_QUEUE_SIZE")
    turn_timeout_s: float = Field(default=120.0, gt=0, validation_alias="OHLORA_TURN_TIMEOUT_S")
    model_stall_s: float | None = Field(default=None, ge=0, validation_alias="OHLORA_MODEL_STALL_S")
    """Seconds one model call may run before the worker gives up on it; see `stall_after_s`."""
    rate_limit_per_minute: int = Field(default=12, ge=0, validation_alias="OHLORA_RATE_LIMIT_PER_MINUTE")
    replay_within_s: float = Field(default=600.0, ge=0, validation_alias="OHLORA_REPLAY_WITHIN_S")
    """After a restart, messages received this recently and not answered are answered; older ones
    get a short "I was restarted" notice."""
    memory_threshold: float = Field(default=0.95, validation_alias="OHLORA_MEMORY_THRESHOLD")
    parallel_samples: int = Field(default=3, ge=1, le=15, validation_alias="OHLORA_PARALLEL_SAMPLES")
    turn_log_days: float = Field(default=30.0, ge=0, validation_alias="OHLORA_TURN_LOG_DAYS")
    """Days the turn log keeps each turn (what was said and answered); 0 keeps them all, up to the row cap."""
    turn_log_max_rows: int = Field(default=100_000, ge=1, validation_alias="OHLORA_TURN_LOG_MAX_ROWS")
    log_level: str = Field(default="INFO", validation_alias="OHLORA_LOG_LEVEL")

    @field_validator("admin_ids", mode="before")
    @classmethod
    def _split_admin_ids(cls, value: object) -> object:
        """`telegram:777,discord:1234` in the environment; any iterable from code."""
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("face")
    @classmethod
    def _check_face(cls, value: str) -> str:
        if value != "random" and not value.isdigit():
            raise ValueError("OHLORA_FACE must be a face number or 'random'")
        return value

    @model_validator(mode="after")
    def _vllm_needs_a_url(self) -> Settings:
        if self.llm_backend is LlmBackend.VLLM and not self.vllm_url:
            raise ValueError("OHLORA_LLM_BACKEND=vllm needs OHLORA_VLLM_URL (see README, 'Scaling out with vLLM')")
        return self

    @property
    def stall_after_s(self) -> float | None:
        """The inference worker's stall limit: unset means the turn timeout + 30 s, 0 means never.

        A call that starts during a turn is never waited on past that turn's deadline, and the
        LLM stops itself there; 30 s more leaves room for the one decoding step, encode or render
        in flight. Any less risks abandoning an honest call, whose thread may still be using the
        models when its replacement starts (see `InferenceWorker`).
        """
        if self.model_stall_s is None:
            return self.turn_timeout_s + STALL_MARGIN_S
        return self.model_stall_s or None

    @property
    def default_face(self) -> int | None:
        return None if self.face == "random" else int(self.face)
