"""Scopes and the policy file (``--policy``): a TOML file of ``[[rule]]`` tables, each naming one
``uid``, ``gid``, ``user`` or ``group`` and the scopes it ``allow``s (read, write, events, metrics);
a caller holds the union of the rules matching its uid, gid and groups."""

import grp
import hashlib
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from app.logs import escaped

SCOPES = ("read", "write", "events", "metrics")
ALL = frozenset(SCOPES)
NONE: frozenset[str] = frozenset()
OPEN = ""  # what scope_for answers for a path anyone who can connect may use
MAX_BYTES = 1 << 20  # a larger policy file is refused (a rule is a few dozen bytes)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/_ping"})  # open to any peer, whatever the policy
_SELECTORS = ("uid", "gid", "user", "group")
_RULE_HEADER = re.compile(r"^\s*\[\[\s*rule\s*\]\]")
_AT_LINE = re.compile(r"\s*\(at line (\d+), column \d+\)$")


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file, the line and what is wrong."""


@dataclass(frozen=True, slots=True)
class Policy:
    """Rules indexed by uid and by gid: each id maps to the union of the scopes its rules allow."""

    by_uid: Mapping[int, frozenset[str]]
    by_gid: Mapping[int, frozenset[str]]
    rules: int
    digest: str  # the first 12 hex digits of the file's SHA-256 ("flags" for the shorthand alone)

    def scopes(self, uid: int, gid: int, groups: Iterable[int] = ()) -> frozenset[str]:
        """The scopes held by a process with this uid, gid and supplementary groups."""
        by_gid = self.by_gid
        return self.by_uid.get(uid, NONE).union(by_gid.get(gid, NONE), *(by_gid.get(g, NONE) for g in groups))

    def granting_all(self, uids: Sequence[int], gids: Sequence[int]) -> "Policy":
        """This policy and ``--allow-uid``/``--allow-gid``: every scope for each id given."""
        by_uid = {**self.by_uid, **dict.fromkeys(uids, ALL)}
        by_gid = {**self.by_gid, **dict.fromkeys(gids, ALL)}
        return Policy(by_uid, by_gid, self.rules + len(uids) + len(gids), self.digest)


def scope_table(versions: Iterable[int]) -> dict[str, str]:
    """Decoded paths whose scope is not read-or-write by method: probes, whoami, events, metrics."""
    table = dict.fromkeys(OPEN_PATHS, OPEN)
    table["/metrics"] = "metrics"
    for prefix in ("", *(f"/v{version}" for version in versions)):
        table[f"{prefix}/whoami"] = OPEN
        table[f"{prefix}/events"] = "events"
    return table


def scope_for(table: Mapping[str, str], method: str, path: str) -> str:
    """The table's entry for the path, else ``read`` for GET and HEAD and ``write`` for anything else."""
    needed = table.get(path)
    if needed is not None:
        return needed
    return "read" if method == "GET" or method == "HEAD" else "write"


def load_policy(path: str) -> Policy:
    """Read and check the policy file at ``path``; raise PolicyError naming the file and the line."""
    name = escaped(path)  # a path with a line break or an escape code must not break the error line
    where = f"policy file {name}"
    try:
        # O_NONBLOCK: a FIFO planted in the file's place must not hang the start or a reload.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as file:
            info = os.fstat(fd)
            mode = stat.S_IMODE(info.st_mode)
            if not stat.S_ISREG(info.st_mode):
                raise PolicyError(f"{where}: not a regular file")
            if info.st_uid not in (0, os.geteuid()):
                raise PolicyError(
                    f"{where}: owned by uid {info.st_uid}, neither root nor this server's "
                    f"{os.geteuid()}; whoever owns it decides the rules"
                )
            # Not even the server's own group: in the Pod it is the group every container shares.
            if mode & stat.S_IWGRP and info.st_gid != 0:
                raise PolicyError(
                    f"{where}: writable by group {info.st_gid} (mode {mode:04o}); its members "
                    "could change the rules: chmod g-w it"
                )
            if mode & stat.S_IWOTH:
                raise PolicyError(f"{where}: writable by every user (mode {mode:04o}); chmod o-w it")
            data = file.read(MAX_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_BYTES:
        raise PolicyError(f"{where}: larger than {MAX_BYTES} bytes")
    if not data:  # what a reload sees between an editor's truncate and its write
        raise PolicyError(f"{where}: empty; to grant nothing, write a comment line in it")
    return parse_policy(data, name)


def parse_policy(data: bytes, name: str) -> Policy:
    """The policy in ``data`` (TOML); ``name`` is the file's name for the error messages."""
    name = escaped(name)
    try:
        text = data.decode("utf-8")
        doc = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(f"policy file {name}, line {line}: not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        found = _AT_LINE.search(str(exc))
        where = f", line {found.group(1)}" if found else ""
        raise PolicyError(f"policy file {name}{where}: {_AT_LINE.sub('', str(exc))}") from None
    unknown = sorted(set(doc) - {"rule"})
    if unknown:
        raise PolicyError(f"policy file {name}: unknown key {unknown[0]!r}; the file holds [[rule]] tables")
    rules = doc.get("rule", [])
    if not isinstance(rules, list):
        raise PolicyError(f"policy file {name}: 'rule' must be written [[rule]], a table per rule")
    lines = [number for number, line in enumerate(text.splitlines(), 1) if _RULE_HEADER.match(line)]
    tables: dict[str, dict[int, frozenset[str]]] = {"uid": {}, "gid": {}}
    for index, rule in enumerate(rules):
        where = f"policy file {name}, line {lines[index]}" if index < len(lines) else f"policy file {name}"
        kind, ident, scopes = _rule(rule, f"{where} (rule {index + 1})")
        tables[kind][ident] = tables[kind].get(ident, NONE) | scopes
    return Policy(tables["uid"], tables["gid"], len(rules), hashlib.sha256(data).hexdigest()[:12])


def _rule(rule: object, where: str) -> tuple[str, int, frozenset[str]]:
    """``("uid" or "gid", id, scopes)`` of one rule table; PolicyError saying what is wrong."""
    if not isinstance(rule, dict):
        raise PolicyError(f"{where}: a rule is a table")
    unknown = sorted(set(rule) - {*_SELECTORS, "allow"})
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r}; use one of uid, gid, user, group and allow")
    named = [key for key in _SELECTORS if key in rule]
    if len(named) != 1:
        problem = "no selector" if not named else f"{' and '.join(named)} together"
        raise PolicyError(f"{where}: {problem}; give exactly one of uid, gid, user, group")
    key = named[0]
    value = rule[key]
    if key in ("uid", "gid"):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32 - 1:
            raise PolicyError(f"{where}: {key} must be a number from 0, not {value!r}")
        ident = value
    elif not isinstance(value, str):
        raise PolicyError(f"{where}: {key} must be a name in quotes, not {value!r}")
    else:
        try:
            ident = pwd.getpwnam(value).pw_uid if key == "user" else grp.getgrnam(value).gr_gid
        except KeyError:
            raise PolicyError(f"{where}: no {key} named {value!r} on this system") from None
    allow = rule.get("allow")
    if not isinstance(allow, list) or not all(isinstance(item, str) for item in allow):
        raise PolicyError(f'{where}: allow must be a list of scopes, e.g. allow = ["read"]')
    for scope in allow:
        if scope not in SCOPES:
            raise PolicyError(f"{where}: unknown scope {scope!r}; choose from {', '.join(SCOPES)}")
    return ("uid" if key in ("uid", "user") else "gid"), ident, frozenset(allow)
