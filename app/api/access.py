"""Who may call what: the policy (``--policy``), its shorthand ``--allow-uid``/``--allow-gid`` and
the audit trail (``--audit-log``), applied by one ASGI middleware installed only when one is set.
Peers, groups, proxies and the cached scopes: docs/internals.md, "Access"."""

import logging
import os
from time import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.audit import MAX_ROUTE, MESSAGE_ID, AuditLog
from app.api.errors import error_response
from app.api.forwarded import HEADER as FORWARDED_HEADER
from app.api.forwarded import parse_forwarded_peer
from app.api.policy import ALL, NONE, OPEN, SCOPES, Policy, PolicyError, load_policy, scope_for, scope_table
from app.config import Settings
from app.connection.peer import CONNECTION_KEY, PEER_KEY, PeerConnection
from app.logs import escaped
from client.net.throttle import Throttle

Ids = dict[str, int]  # credentials: ``uid``, ``gid``, ``pid``
MALFORMED: Ids = {}  # what :func:`_forwarded` answers for a malformed or repeated ``Uds-Forwarded-Peer``
_FLAGS_ONLY = Policy({}, {}, 0, "flags")

log = logging.getLogger("app.api.access")


class Access:
    """This process's rules in force (replaced whole by :meth:`reload`) and its audit log."""

    def __init__(self, settings: Settings, versions: tuple[int, ...]) -> None:
        self.path = settings.policy
        self.allow = (settings.allow_uid, settings.allow_gid)
        # None: no policy and no allowlist, everyone holds every scope. A bad file raises PolicyError.
        self.policy = self._with_flags(load_policy(self.path) if self.path else None)
        self.generation = 0  # bumped on every reload: cached scopes of an older one are stale
        self.table = scope_table(versions)
        self.audit = AuditLog(settings.audit_log) if settings.audit_log else None
        self.installed = self.policy is not None or self.audit is not None  # the middleware is needed

    def _with_flags(self, policy: Policy | None) -> Policy | None:
        uids, gids = self.allow
        if not uids and not gids:
            return policy
        return (policy or _FLAGS_ONLY).granting_all(uids, gids)

    def reload(self) -> bool:
        """SIGHUP: reopen the audit log; a valid policy file replaces the rules, an invalid one does not."""
        if self.audit is not None:
            self.audit.reopen()
        if self.path is None:
            reopened = "; audit log reopened" if self.audit else ""
            log.info("Received SIGHUP: no policy file to reload%s", reopened)
            return False
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            log.error("Policy not reloaded, the rules in force stay: %s", exc)
            return False
        self.policy = self._with_flags(policy)
        self.generation += 1
        shown, pid = escaped(self.path), os.getpid()
        log.info(
            "Policy reloaded from %s in pid %d: %d rule(s), sha256 %s",
            shown,
            pid,
            policy.rules,
            policy.digest,
        )
        return True

    def held(self, peer: Ids | None, connection: PeerConnection | None) -> frozenset[str]:
        """The scopes of the process on the socket (cached on its connection)."""
        policy = self.policy
        if policy is None:
            return ALL
        if peer is None:
            return NONE
        if connection is None:
            return policy.scopes(peer["uid"], peer["gid"])
        if connection.generation != self.generation:
            connection.scopes = policy.scopes(peer["uid"], peer["gid"], connection.groups)
            connection.generation = self.generation
        return connection.scopes

    def held_behind(self, user: Ids) -> frozenset[str]:
        """The scopes of a user named by a proxy (uid and gid only)."""
        return ALL if self.policy is None else self.policy.scopes(user["uid"], user["gid"])

    def whoami(self, scope: Scope) -> dict[str, Any]:
        """``GET /whoami``: the caller's credentials and scopes (through a proxy: those both hold)."""
        extensions = scope.get("extensions") or {}
        peer = extensions.get(PEER_KEY)
        connection = extensions.get(CONNECTION_KEY)
        held = self.held(peer, connection)
        user = _forwarded(scope) if peer is not None else None
        if user:
            held = held & self.held_behind(user)
        doc: dict[str, Any] = {key: peer[key] if peer else None for key in ("uid", "gid", "pid")}
        doc["groups"] = list(connection.groups) if connection is not None else []
        doc["scopes"] = [name for name in SCOPES if name in held]
        doc["forwarded_for"] = {**user, "scopes": doc["scopes"]} if user else None
        return doc


class PeerAllowlist:
    """ASGI middleware: 403 for a scope the caller lacks, body unread; an audit line per write and refusal."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access
        self.refused = Throttle(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        access = self.access
        needed = scope_for(access.table, scope["method"], scope["path"]) if scope["type"] == "http" else OPEN
        if needed == OPEN:  # and lifespan, which has no method
            await self.app(scope, receive, send)
            return
        extensions = scope.get("extensions")
        peer = extensions.get(PEER_KEY) if extensions else None
        held = access.held(peer, extensions.get(CONNECTION_KEY) if extensions else None)
        user = None
        if access.policy is not None and peer is not None:
            user = _forwarded(scope)
            if user is MALFORMED or (user and needed in held and needed not in access.held_behind(user)):
                await self._refuse(scope, receive, send, peer, needed, user)
                return
        if needed not in held:
            await self._refuse(scope, receive, send, peer, needed, None)
            return
        audit = access.audit
        if audit is None or needed != "write":
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if access.policy is None and peer is not None:  # the policy's check did not read it
                user = _forwarded(scope) or None
            audit.note(_entry(scope, peer, user, status, "allow", needed))

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, peer: Ids | None, needed: str, user: Ids | None
    ) -> None:
        """403 naming what is missing (``user``: named by a proxy, or MALFORMED); audit and log lines."""
        if self.access.audit is not None:
            self.access.audit.deny(_entry(scope, peer, user or None, 403, "deny", needed))
        lacks = (
            f"lacks the {needed!r} scope this request needs; `uds-client whoami` shows the scopes you hold"
        )
        if user is MALFORMED:
            why = ": malformed or repeated Uds-Forwarded-Peer header"
            message = "send one Uds-Forwarded-Peer header, reading 'uid=U gid=G pid=P'"
        elif peer is None:
            why = ": no peer credentials (not a Unix socket connection); the policy admits only Unix "
            why += "socket peers"
            message = "this server only accepts allowed peers over its Unix socket"
        elif user is not None:
            why = f" via proxy pid={peer['pid']} for uid={user['uid']} gid={user['gid']}: "
            why += f"lacks the {needed} scope"
            message = f"uid {user['uid']} gid {user['gid']}, behind the proxy, {lacks}"
        elif self.access.path is None:  # the allowlist alone: on it or not
            why = f" from pid={peer['pid']} uid={peer['uid']} gid={peer['gid']}: not in allow_uid/allow_gid"
            message = f"peer uid {peer['uid']} gid {peer['gid']} is not allowed; ask the operator to add "
            message += "it to UDS_ALLOW_UID or UDS_ALLOW_GID"
        else:
            why = f" from pid={peer['pid']} uid={peer['uid']} gid={peer['gid']}: lacks the {needed} scope"
            message = f"uid {peer['uid']} gid {peer['gid']} {lacks}"
        path: str = scope["path"]  # cut (a peer chooses it) and escaped
        shown = escaped(path if len(path) <= MAX_ROUTE else path[:MAX_ROUTE] + "...")
        self.refused.log(logging.WARNING, "Refused %s %s%s", escaped(scope["method"]), shown, why)
        await error_response(403, message)(scope, receive, send)


def _entry(
    scope: Scope, peer: Ids | None, user: Ids | None, status: int, decision: str, need: str
) -> dict[str, Any]:
    """An audit line's fields; ``message_id`` only if allowed, ``forwarded_for`` only via a proxy."""
    uid, gid, pid = (peer["uid"], peer["gid"], peer["pid"]) if peer else (None, None, None)
    method, route = scope["method"][:16], scope["path"][:MAX_ROUTE]
    fields = {"time": time(), "uid": uid, "gid": gid, "pid": pid, "method": method, "route": route}
    fields |= {"status": status, "decision": decision, "scope": need}
    if decision == "allow":
        fields["message_id"] = scope.get(MESSAGE_ID)
    if user is not None:
        fields["forwarded_for"] = user
    return fields


def _forwarded(scope: Scope) -> Ids | None:
    """The user a proxy names, None without the header, MALFORMED if malformed or repeated."""
    values = [value for name, value in scope["headers"] if name == FORWARDED_HEADER]
    if not values:
        return None
    user = parse_forwarded_peer(values[0]) if len(values) == 1 else None
    return MALFORMED if user is None else user
