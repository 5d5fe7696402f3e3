"""Face numbers, blocks and channel allowlists over the four plain settings methods of a store."""

from __future__ import annotations

import abc

from core.store.values import BLOCKED_SCOPE, FACE_KEY, allowed_channels_scope


class TypedSettings(abc.ABC):
    """Face numbers, blocks and channel allowlists, written as plain settings rows.

    Written once, over the four plain settings methods, so each setting's encoding (its scope,
    key and value) exists in one place for both stores and for any future migration.
    """

    @abc.abstractmethod
    async def get_setting(self, scope: str, key: str) -> str | None: ...

    @abc.abstractmethod
    async def set_setting(self, scope: str, key: str, value: str) -> None: ...

    @abc.abstractmethod
    async def delete_setting(self, scope: str, key: str) -> None: ...

    @abc.abstractmethod
    async def settings(self, scope: str) -> dict[str, str]: ...

    async def face_for(self, scope: str) -> int | None:
        value = await self.get_setting(scope, FACE_KEY)
        return None if value is None else int(value)

    async def set_face(self, scope: str, face: int | None) -> None:
        """Pin a face number for a guild or chat; None goes back to the configured default."""
        if face is None:
            await self.delete_setting(scope, FACE_KEY)
        else:
            await self.set_setting(scope, FACE_KEY, str(face))

    async def is_blocked(self, user_key: str) -> bool:
        return await self.get_setting(BLOCKED_SCOPE, user_key) is not None

    async def set_blocked(self, user_key: str, blocked: bool) -> None:
        if blocked:
            await self.set_setting(BLOCKED_SCOPE, user_key, "1")
        else:
            await self.delete_setting(BLOCKED_SCOPE, user_key)

    async def blocked_users(self) -> list[str]:
        return sorted(await self.settings(BLOCKED_SCOPE))

    async def is_channel_allowed(self, platform: str, channel_id: str) -> bool:
        """Whether the channel is on the allowlist; what an empty allowlist means is policy."""
        return await self.get_setting(allowed_channels_scope(platform), channel_id) is not None

    async def set_channel_allowed(self, platform: str, channel_id: str, allowed: bool) -> None:
        if allowed:
            await self.set_setting(allowed_channels_scope(platform), channel_id, "1")
        else:
            await self.delete_setting(allowed_channels_scope(platform), channel_id)

    async def allowed_channels(self, platform: str) -> list[str]:
        return sorted(await self.settings(allowed_channels_scope(platform)))
