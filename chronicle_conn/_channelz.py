"""How many backends of a channel are ready, from gRPC's own channelz registry.

grpc-python exposes no subchannel state; channelz (on by default in gRPC core) does,
as JSON, through ``cygrpc``. It is read only when ``stats()`` asks, never while a
channel is built (a forked child whose gRPC skipped its fork handlers must not touch
it to connect). The channel is found by its target, so the answer is None when the
process has several channels to that target (except in a forked child, where the
newest is taken: the parent's, copied into the child, are older; another connection
of the child's to the same target, built later, would be read instead). A backend
that is connected but NOT_SERVING (client-side health checking) still counts as
ready: channelz reports the transport. Every function answers None when channelz
cannot tell.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["backends_ready"]

#: At most this many pages of top channels are read (100 channels a page).
_MAX_PAGES = 100


def _cygrpc() -> Any:
    from grpc._cython import cygrpc  # type: ignore[attr-defined]  # noqa: PLC0415

    return cygrpc


def _channel_ids(target: str) -> list[int]:
    cygrpc = _cygrpc()
    found: list[int] = []
    start = 0
    for _ in range(_MAX_PAGES):
        page = json.loads(cygrpc.channelz_get_top_channels(start))
        channels = page.get("channel", [])
        for channel in channels:
            number = int(channel["ref"]["channelId"])
            start = max(start, number + 1)
            if channel.get("data", {}).get("target") == target:
                found.append(number)
        if page.get("end", True) or not channels:
            break
    return found


def backends_ready(target: str, *, newest: bool = False) -> int | None:
    """How many backends of the process's one channel to ``target`` have a READY
    transport; None when channelz cannot tell (no such channel, or several: another
    connection to the same target, a replaced channel still finishing its calls).

    ``newest``: of several, the one built last (channelz numbers channels in order): in
    a forked child, the channels copied from the parent are older than the child's own.
    """
    try:
        ids = _channel_ids(target)
        if not ids or (len(ids) > 1 and not newest):
            return None
        return _ready(max(ids))
    except Exception:  # another grpc version's JSON
        return None


def _ready(channel_id: int) -> int:
    cygrpc = _cygrpc()
    channel = json.loads(cygrpc.channelz_get_channel(channel_id))["channel"]
    ready = 0
    for ref in channel.get("subchannelRef", []):
        sub = json.loads(cygrpc.channelz_get_subchannel(int(ref["subchannelId"])))
        state = sub["subchannel"].get("data", {}).get("state", {}).get("state")
        ready += state == "READY"
    return ready
