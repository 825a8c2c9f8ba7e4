"""How many backends of a channel are ready, from gRPC's own channelz registry.

grpc-python exposes no subchannel state; channelz (on by default in gRPC core) does,
as JSON, through ``cygrpc``. A channel is found by its target right after it is built
(:func:`new_channel_id`); its subchannels' connectivity states then say how many
backends have a ready transport. A backend that is connected but NOT_SERVING (client-
side health checking) still counts as ready here: channelz reports the transport.
Every function answers None when channelz cannot tell (another grpc version).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["backends_ready", "build_and_find"]

#: Builds are serialised here, so that the channel that appeared is the one just built.
_lock = threading.Lock()

#: At most this many pages of top channels are read (100 channels a page).
_MAX_PAGES = 100


def _cygrpc() -> Any:
    from grpc._cython import cygrpc  # type: ignore[attr-defined]  # noqa: PLC0415

    return cygrpc


def _channel_ids(target: str) -> set[int]:
    cygrpc = _cygrpc()
    found: set[int] = set()
    start = 0
    for _ in range(_MAX_PAGES):
        page = json.loads(cygrpc.channelz_get_top_channels(start))
        channels = page.get("channel", [])
        for channel in channels:
            number = int(channel["ref"]["channelId"])
            start = max(start, number + 1)
            if channel.get("data", {}).get("target") == target:
                found.add(number)
        if page.get("end", True) or not channels:
            break
    return found


def build_and_find(target: str, build: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``build()`` (which makes one channel to ``target``) and return its result with
    the new channel's channelz id, or None when it cannot be told apart."""
    with _lock:
        try:
            before = _channel_ids(target)
        except Exception:  # channelz unavailable: build anyway
            return build(), None
        made = build()
        try:
            new = _channel_ids(target) - before
        except Exception:
            return made, None
    return made, new.pop() if len(new) == 1 else None


def backends_ready(channel_id: int) -> int | None:
    """How many subchannels of the channel ``channel_id`` are READY (None: unknown)."""
    try:
        cygrpc = _cygrpc()
        channel = json.loads(cygrpc.channelz_get_channel(channel_id))["channel"]
        ready = 0
        for ref in channel.get("subchannelRef", []):
            sub = json.loads(cygrpc.channelz_get_subchannel(int(ref["subchannelId"])))
            state = sub["subchannel"].get("data", {}).get("state", {}).get("state")
            ready += state == "READY"
        return ready
    except Exception:  # gone (closed), or another grpc version's JSON
        return None
