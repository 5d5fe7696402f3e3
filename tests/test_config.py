"""Settings: `.env.example` documents every setting and parses as shipped; tokens stay secret."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from core.config import LlmBackend, ModelProfile, Settings
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / ".env.example"


def test_the_example_file_parses_as_shipped() -> None:
    settings = Settings(_env_file=EXAMPLE)  # type: ignore[call-arg]

    assert settings.discord_token is None and settings.telegram_token is None
    assert settings.admin_ids == frozenset()
    assert settings.model_profile is ModelProfile.REAL
    assert settings.max_prompt_tokens == 48


def test_every_setting_is_in_the_example_file() -> None:
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", EXAMPLE.read_text(encoding="utf-8"), flags=re.MULTILINE))
    names = {field.validation_alias for field in Settings.model_fields.values()}

    assert names <= documented


def test_admin_ids_are_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OHLORA_ADMIN_IDS", "telegram:777, discord:1234,")

    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    assert settings.admin_ids == {"telegram:777", "discord:1234"}
    assert "telegram:777" in settings.admin_ids and "telegram:1234" not in settings.admin_ids


def test_tokens_never_show_in_a_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_TOKEN", "123:very-secret")

    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    assert "very-secret" not in repr(settings)
    assert settings.telegram_token is not None and settings.telegram_token.get_secret_value() == "123:very-secret"


def test_vllm_backend_needs_a_url() -> None:
    with pytest.raises(ValidationError, match="OHLORA_VLLM_URL"):
        Settings(_env_file=None, llm_backend=LlmBackend.VLLM)  # type: ignore[call-arg]


def test_face_must_be_a_number_or_random() -> None:
    assert Settings(_env_file=None, face="127").default_face == 127  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        Settings(_env_file=None, face="pretty")  # type: ignore[call-arg]


def test_the_model_stall_limit_follows_the_turn_timeout_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=EXAMPLE).stall_after_s == 150.0  # type: ignore[call-arg]
    assert Settings(_env_file=None, turn_timeout_s=20).stall_after_s == 50.0  # type: ignore[call-arg]

    monkeypatch.setenv("OHLORA_MODEL_STALL_S", "300")
    assert Settings(_env_file=None).stall_after_s == 300.0  # type: ignore[call-arg]
    monkeypatch.setenv("OHLORA_MODEL_STALL_S", "0")
    assert Settings(_env_file=None).stall_after_s is None  # type: ignore[call-arg]
    monkeypatch.setenv("OHLORA_MODEL_STALL_S", "-1")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_int8_and_face_precision_take_only_their_choices() -> None:
    settings = Settings(_env_file=None, llm_int8="off", face_precision="exact")  # type: ignore[call-arg]
    assert (settings.llm_int8, settings.face_precision) == ("off", "exact")
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (defaults.llm_int8, defaults.face_precision) == ("auto", "auto")
    with pytest.raises(ValidationError, match="llm_int8|OHLORA_LLM_INT8"):
        Settings(_env_file=None, llm_int8="yes")  # type: ignore[call-arg,arg-type]
    with pytest.raises(ValidationError, match="face_precision|OHLORA_FACE_PRECISION"):
        Settings(_env_file=None, face_precision="float16")  # type: ignore[call-arg,arg-type]


def test_the_replay_window_defaults_to_ten_minutes_and_cannot_be_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a restart, messages younger than this are answered; older ones get the "I was restarted" notice."""
    assert Settings(_env_file=None).replay_within_s == 600.0  # type: ignore[call-arg]

    monkeypatch.setenv("OHLORA_REPLAY_WITHIN_S", "30")
    assert Settings(_env_file=None).replay_within_s == 30.0  # type: ignore[call-arg]
    monkeypatch.setenv("OHLORA_REPLAY_WITHIN_S", "0")
    assert Settings(_env_file=None).replay_within_s == 0.0  # type: ignore[call-arg]
    monkeypatch.setenv("OHLORA_REPLAY_WITHIN_S", "-1")
    with pytest.raises(ValidationError, match="OHLORA_REPLAY_WITHIN_S|replay_within_s"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_settings_hold_the_admin_list_but_do_not_decide_who_is_admin() -> None:
    """Who may do what is decided in one place, `bot.commands`; a second check here could drift from it."""
    assert not hasattr(Settings, "is_admin")
