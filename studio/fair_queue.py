"""A fair share of Gradio's queue: one user's backlog never refuses another user's first request.

Gradio bounds its queue with one global `max_size`: one student who sent 70 Evaluate requests filled it,
and everyone else's Compare, Start and Prepare got "Queue is full" for as long as his took. Here each
asker may have at most `per_user` requests waiting or running, and past `max_waiting` requests waiting
in all only an asker with none gets in (up to a hard ceiling, a bound on memory).

Who asks: the signed-in user; without sign-in both the page's session and, for a client on the network,
its address (a session hash is the client's choice; an address is not). An address counts as
`users_per_address` users, so a classroom behind one router still works; connections from this machine
itself (the person at the server, local tools, a proxy that does not pass X-Forwarded-For) count per
session only.

The seam is the queue's `push`, through which every join passes (/queue/join and /call/<api>): a
refusal raises before Gradio has recorded anything, so a refused request changes nothing. Requests
that skip the queue (queue=False: the Train tab's poll, Stop) are never refused here.
"""
from __future__ import annotations

import ipaddress
from collections import Counter

from fastapi import HTTPException

from core.api import is_visitor

TOO_MANY = 429  # the browser shows a refusal's detail for any status but 503 (there: "currently busy")
CEILING = 4  # times max_waiting: past it every request waits for room, first ones too


def is_local(host: str | None) -> bool:
    """Whether a client address is this machine (or unknown: a test transport has none)."""
    if not host:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def askers(username: str | None, session: str | None, host: str | None, by_address: bool) -> list[tuple]:
    """The keys a request counts against: ('user', name), else ('session', hash) and ('address', host). A demo's
    visitor is a user whose name is a cookie of the client's choosing: their address counts too."""
    if username and not is_visitor(username):
        return [("user", username)]
    keys = [("user", username)] if username else [("session", session)] if session else []
    if by_address and not is_local(host):
        keys.append(("address", host))
    return keys


class FairQueue:
    """Wraps a gradio Queue's push with per-asker limits (see the module's docstring)."""

    def __init__(self, queue, per_user: int, users_per_address: int, max_waiting: int):
        self.queue, self.per_user, self.max_waiting = queue, per_user, max_waiting
        self.per_address = per_user * users_per_address  # 0: no address limit
        self._push = queue.push
        self._joining: Counter = Counter()  # keys of joins between our check and Gradio's record of them

    def keys_of(self, username, session, request) -> list[tuple]:
        host = request.client.host if request is not None and request.client is not None else None
        return askers(username, session, host, self.per_address > 0)

    def live(self) -> Counter:
        """Requests waiting or running per key (Gradio drops an event from this map when it ends)."""
        counts = Counter(self._joining)
        for event in list(self.queue.event_ids_to_events.values()):
            counts.update(self.keys_of(event.username, event.session_hash, event.request))
        return counts

    def refusal(self, keys: list[tuple]) -> str | None:
        """Why a new request of `keys` is refused now (one sentence), or None."""
        counts = self.live()
        for kind, key in keys:
            cap = self.per_address if kind == "address" else self.per_user
            n = counts[(kind, key)]
            if n >= cap:
                who = "Your address already has" if kind == "address" else "You already have"
                scope = " for all pages from one address" if kind == "address" else ""
                return (f"{who} {n} requests waiting or running (the limit is {cap}{scope}); wait for them to "
                        f"finish, then try again.")
        waiting = len(self.queue)
        if waiting >= CEILING * self.max_waiting:
            return f"The server is overloaded ({waiting} requests waiting); try again in a few minutes."
        if waiting >= self.max_waiting and any(counts[k] for k in keys):
            return (f"The server is busy ({waiting} requests waiting) and you already have one waiting or running; "
                    f"wait for it to finish, then try again.")
        return None

    async def push(self, body, request, username):
        keys = self.keys_of(username, body.session_hash, request)
        reason = self.refusal(keys)
        if reason is not None:
            raise HTTPException(status_code=TOO_MANY, detail=reason)
        self._joining.update(keys)  # push may await before the event is recorded: count it meanwhile
        try:
            return await self._push(body=body, request=request, username=username)
        finally:
            self._joining.subtract(keys)
            self._joining += Counter()  # drop zero counts


def install(demo, per_user: int, users_per_address: int, max_waiting: int) -> FairQueue:
    """Give `demo`'s queue (after demo.queue()) per-asker limits; Gradio's own global bound goes, as ours
    takes its place."""
    queue = demo._queue
    fair = FairQueue(queue, per_user, users_per_address, max_waiting)
    queue.max_size = None
    queue.push = fair.push
    return fair
