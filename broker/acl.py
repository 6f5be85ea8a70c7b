"""Who may read and write which topic: the broker's access policy, as a Mosquitto ACL file.

One policy, two enforcers. ``render_acl`` writes the file Mosquitto loads (``acl_file``);
``Acl.parse`` reads that same file back and ``Acl.allows`` answers as Mosquitto 2.0 does, so
the embedded amqtt broker (broker/amqtt_security.py) enforces it from the very same file.

The policy (``{root}`` is the topic root, ``dockercomp`` by default)::

    volunteer   (pattern, %u = the account name = the {volunteer} topic level)
        write  {root}/workers/%u/+/presence     its workers' presence (and their wills)
        write  {root}/workers/%u/+/results      its workers' results
        read   {root}/workers/%u/+/tasks        its workers' tasks, nobody else's
        read   {root}/status/workers/%u/#       the status of its own workers
        read   {root}/coordinator/rebirth       rebirth requests (a pattern without %u: every
                                                client may read them; they name only workers)
        read   {root}/status/volunteers/%u      its own credit, trust and quarantine
    coordinator
        read   {root}/workers/+/+/presence, {root}/workers/+/+/results
        write  {root}/workers/+/+/tasks, {root}/workers/+/+/presence (clears a purged worker)
        readwrite {root}/status/#, {root}/coordinator/presence, {root}/coordinator/nudge
                                                (submit, run with the coordinator's account, nudges serve)
        write  {root}/coordinator/rebirth       only the coordinator asks workers to announce
    observer
        deny   {root}/workers/#                 (overrides the volunteer patterns)
        read   {root}/status/#, {root}/coordinator/presence   (the dashboard shows whether it is up)
    anonymous (only if the broker sets allow_anonymous true)
        read   {root}/status/#, {root}/coordinator/presence

Trust unit: the volunteer account. All workers of one volunteer share its password, so the
ACL confines a volunteer to its own subtree, not one worker to its own topics (a worker could
as well claim any worker name under its volunteer). Mosquitto semantics mirrored here,
verified against Mosquitto 2.0.11:

- ``topic`` lines before the first ``user`` line apply to anonymous clients ONLY.
- ``pattern`` lines apply to EVERY client; a pattern using ``%u`` is skipped for anonymous
  clients, but one without ``%u``/``%c`` grants anonymous clients too (so we have none).
- A matching ``deny`` wins over any grant; the client's own lines are checked before patterns.
- SUBSCRIBE is always granted (SUBACK says QoS 1); ``read`` is checked per delivered message,
  so a forbidden subscription simply never receives anything.
- A forbidden PUBLISH is acknowledged (PUBACK) and silently dropped; so is a forbidden will.
- Topics starting with ``$`` only match rules that start with ``$``.
- A user name or client id containing ``+`` or ``#`` is denied everything by patterns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from paho.mqtt.client import topic_matches_sub

from dockercomp.broker.defaults import ROOT_TOPIC
from dockercomp.broker.errors import SettingsError


class Role(str, Enum):
    VOLUNTEER = "volunteer"  # runs workers: its own presence and results, its own tasks
    COORDINATOR = "coordinator"  # the scientist's coordinator: every worker's traffic, status
    OBSERVER = "observer"  # a person or dashboard: reads status topics only


class Access(str, Enum):
    READ = "read"  # receive messages on matching topics
    WRITE = "write"  # publish on matching topics (wills included)
    READWRITE = "readwrite"  # both
    DENY = "deny"  # neither, whatever any other line grants


@dataclass(frozen=True)
class Rule:
    """One ACL line: an access to a topic filter (patterns may use %u and %c)."""

    access: Access
    topic: str

    def grants(self, access: Access) -> bool:
        return self.access is Access.READWRITE or self.access is access

    def line(self, keyword: str) -> str:
        return f"{keyword} {self.access.value} {self.topic}"


def volunteer_patterns(root: str = ROOT_TOPIC) -> list[Rule]:
    """Patterns (with %u) confining each volunteer account to its own workers' topics."""
    return [
        Rule(Access.WRITE, f"{root}/workers/%u/+/presence"),
        Rule(Access.WRITE, f"{root}/workers/%u/+/results"),
        Rule(Access.READ, f"{root}/workers/%u/+/tasks"),
        Rule(Access.READ, f"{root}/status/workers/%u/#"),
        # No %u: Mosquitto grants it to every client, anonymous ones too. Harmless: a rebirth
        # request carries worker keys at most, which the status topics publish anyway.
        Rule(Access.READ, f"{root}/coordinator/rebirth"),
        Rule(Access.READ, f"{root}/status/volunteers/%u"),
    ]


def role_rules(role: Role, root: str = ROOT_TOPIC) -> list[Rule]:
    """The ``user`` block of an account; volunteers need none (the patterns cover them)."""
    if role is Role.COORDINATOR:
        return [
            Rule(Access.READ, f"{root}/workers/+/+/presence"),
            Rule(Access.WRITE, f"{root}/workers/+/+/presence"),
            Rule(Access.READ, f"{root}/workers/+/+/results"),
            Rule(Access.WRITE, f"{root}/workers/+/+/tasks"),
            Rule(Access.READWRITE, f"{root}/status/#"),
            Rule(Access.READWRITE, f"{root}/coordinator/presence"),
            # A submitter wakes the engine: only the coordinator account may (no flood by others).
            Rule(Access.READWRITE, f"{root}/coordinator/nudge"),
            Rule(Access.WRITE, f"{root}/coordinator/rebirth"),
        ]
    if role is Role.OBSERVER:
        # The deny beats the volunteer patterns, which apply to every account.
        return [Rule(Access.DENY, f"{root}/workers/#"), Rule(Access.READ, f"{root}/status/#"),
                Rule(Access.READ, f"{root}/coordinator/presence")]
    return []


def anonymous_rules(root: str = ROOT_TOPIC) -> list[Rule]:
    """What an anonymous client may do when the broker lets one in at all."""
    # Plus the coordinator's presence (documented as read by observers): whether it is up.
    return [Rule(Access.READ, f"{root}/status/#"), Rule(Access.READ, f"{root}/coordinator/presence")]


def render_acl(accounts: Mapping[str, Role], root: str = ROOT_TOPIC) -> str:
    """The Mosquitto ``acl_file`` text for these accounts (name -> role)."""
    lines = [
        "# dockercomp broker ACL. Generated by `dockercomp coordinator volunteers`: edits are overwritten.",
        "# Mosquitto reloads it on SIGHUP; `dockercomp broker serve --acl-file` (amqtt) reads it too.",
        "",
        "# Anonymous clients (only if mosquitto.conf sets allow_anonymous true): status only.",
        *(rule.line("topic") for rule in anonymous_rules(root)),
        "",
    ]
    for name in sorted(accounts):
        rules = role_rules(accounts[name], root)
        if rules:
            lines += [f"# {accounts[name].value}", f"user {name}", *(r.line("topic") for r in rules), ""]
    lines += [
        "# Every volunteer account (%u = account name = the {volunteer} topic level).",
        *(rule.line("pattern") for rule in volunteer_patterns(root)),
    ]
    return "\n".join(lines) + "\n"


def _parse_rule(words: list[str], number: int) -> Rule:
    # "topic [access] TOPIC": the access is optional and defaults to readwrite.
    if len(words) == 2:
        return Rule(Access.READWRITE, words[1])
    if len(words) == 3:
        try:
            return Rule(Access(words[1]), words[2])
        except ValueError:
            pass
    raise SettingsError(
        f"ACL line {number}: expected '{words[0]} [read|write|readwrite|deny] TOPIC', got {' '.join(words)!r}"
    )


@dataclass
class Acl:
    """A parsed Mosquitto ACL file, answering access questions the way Mosquitto 2.0 does."""

    anonymous: list[Rule] = field(default_factory=list)
    users: dict[str, list[Rule]] = field(default_factory=dict)
    patterns: list[Rule] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Acl:
        acl = cls()
        current: list[Rule] = acl.anonymous
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            # Topics may contain spaces in Mosquitto; ours never do, so split on whitespace.
            keyword, _, rest = line.partition(" ")
            if keyword == "user":
                name = rest.strip()
                if not name:
                    raise SettingsError(f"ACL line {number}: 'user' needs a name")
                current = acl.users.setdefault(name, [])
            elif keyword in ("topic", "pattern"):
                rule = _parse_rule([keyword, *rest.split()], number)
                (current if keyword == "topic" else acl.patterns).append(rule)
            else:
                raise SettingsError(f"ACL line {number}: unknown keyword {keyword!r} (topic, pattern, user)")
        return acl

    def allows(self, username: str | None, client_id: str, topic: str, access: Access) -> bool:
        """May this client read (receive) or write (publish) ``topic``?"""
        own = self.users.get(username, []) if username is not None else self.anonymous
        verdict = _check(own, topic, access)
        if verdict is not None:
            return verdict
        if any(c in (username or "") or c in client_id for c in "+#"):
            return False  # Mosquitto: "ACL denying access to client with dangerous client id"
        patterns = []
        for rule in self.patterns:
            if "%u" in rule.topic and username is None:
                continue
            expanded = rule.topic.replace("%u", username or "").replace("%c", client_id)
            patterns.append(Rule(rule.access, expanded))
        return bool(_check(patterns, topic, access))


def _check(rules: Iterable[Rule], topic: str, access: Access) -> bool | None:
    """False if a deny matches, True if a grant matches, None if no rule says anything."""
    matching = [r for r in rules if _matches(r.topic, topic)]
    if any(r.access is Access.DENY for r in matching):
        return False
    if any(r.grants(access) for r in matching):
        return True
    return None


def _matches(topic_filter: str, topic: str) -> bool:
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False
    try:
        return bool(topic_matches_sub(topic_filter, topic))
    except ValueError:  # a malformed filter in the file matches nothing
        return False
