"""Commands written to NAME-request@, read from the Subject and the first lines of the body.

A command is one line: ``subscribe [ADDRESS]``, ``unsubscribe [ADDRESS]``,
``confirm TOKEN``, ``help``, ``who``, and for owners ``add ADDRESS [NAME]`` and
``remove ADDRESS``. The Subject counts when it holds a command (without its
``Re:`` prefixes, so a reply to a confirmation mail works); the body is read
from its first own line (quoted lines, the "On ... wrote:" line above a quote
and blank lines skipped) up to the signature (``-- ``), the word ``end``, or
the first line that is not a command: people write a greeting or paste a letter,
and a list server that answered every line of it would be a backscatter source.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from email.message import EmailMessage

from listserv import mail
from listserv.moderation.verdicts import body_text

#: body lines read at most (commands and the skipped lines between them)
MAX_LINES = 20
#: commands carried out per message at most
MAX_COMMANDS = 10

_REPLY_PREFIX = re.compile(r"^(?:\s*(?:re|aw|sv|antw|fwd?)\s*(?:\[\d+\])?\s*:\s*)+", re.IGNORECASE)


class Verb(enum.StrEnum):
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    CONFIRM = "confirm"
    HELP = "help"
    WHO = "who"
    ADD = "add"
    REMOVE = "remove"


#: other words people use for the same command
ALIASES = {
    "join": Verb.SUBSCRIBE,
    "sub": Verb.SUBSCRIBE,
    "leave": Verb.UNSUBSCRIBE,
    "signoff": Verb.UNSUBSCRIBE,
    "unsub": Verb.UNSUBSCRIBE,
    "members": Verb.WHO,
    "?": Verb.HELP,
}
_WORDS: dict[str, Verb] = {v.value: v for v in Verb} | ALIASES
_ENDS = frozenset({"end", "stop", "quit", "thanks", "thank you"})


@dataclass(frozen=True, slots=True)
class Command:
    verb: Verb
    #: the words after the verb, as written (an address, a token, a display name)
    args: tuple[str, ...] = ()

    def __str__(self) -> str:
        return " ".join((self.verb.value, *self.args))


def parse_line(line: str) -> Command | None:
    """The command a line states, or None (not a command, or one with the wrong arguments)."""
    words = line.strip().split()
    if not words:
        return None
    verb = _WORDS.get(words[0].lower().rstrip(":"))
    if verb is None:
        return None
    args = tuple(_bare(w) for w in words[1:])
    if verb in (Verb.HELP, Verb.WHO) and args:
        return None
    if verb in (Verb.SUBSCRIBE, Verb.UNSUBSCRIBE) and len(args) > 1:
        return None  # "subscribe me please": a sentence, not a command
    if verb in (Verb.CONFIRM, Verb.REMOVE) and len(args) != 1:
        return None
    if verb is Verb.ADD and not args:
        return None
    if verb is Verb.ADD:  # add ADDRESS [NAME...]: the name keeps its own words
        args = (args[0], " ".join(words[2:])) if len(args) > 1 else args
    return Command(verb, args)


def _bare(word: str) -> str:
    """`<ann@x>`, `address=ann@x` and `mailto:ann@x` name the same address."""
    word = word.strip()
    for prefix in ("address=", "mailto:"):
        if word.lower().startswith(prefix):
            word = word[len(prefix) :]
    if word.startswith("<") and word.endswith(">"):
        word = word[1:-1]
    return word


def read(msg: EmailMessage) -> tuple[list[Command], str | None]:
    """The commands of a message, in order, each once; and the first line that was not
    a command when nothing was found (so the answer can quote what it did not understand)."""
    found: list[Command] = []
    subject = _REPLY_PREFIX.sub("", mail.header(msg, "Subject") or "").strip()
    if (command := parse_line(subject)) is not None:
        found.append(command)
    unknown: str | None = None
    lines = [line.rstrip() for line in body_text(msg).splitlines()]
    for i, line in enumerate(lines[:MAX_LINES]):
        text = line.strip()
        if line in ("-- ", "--") or text.lower().rstrip(".!") in _ENDS:
            break
        if not text or text.startswith(">"):
            continue
        following = next((n.strip() for n in lines[i + 1 :] if n.strip()), "")
        if text.endswith(":") and following.startswith(">"):
            continue  # "On Mon, 1 Dec 2026, Ann wrote:"
        command = parse_line(text)
        if command is None:
            if not found:
                unknown = text[:80]
            break
        if command not in found:
            found.append(command)
    return found[:MAX_COMMANDS], (None if found else unknown or (subject[:80] or None))
