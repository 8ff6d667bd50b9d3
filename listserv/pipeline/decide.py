"""Run the post rules in order: a reject or discard ends the run, holds accumulate."""

from __future__ import annotations

from collections.abc import Sequence

from listserv.pipeline.context import PostContext
from listserv.pipeline.decision import ACCEPT, Action, Decision
from listserv.pipeline.rules import RULES, Rule


def decide(ctx: PostContext, rules: Sequence[Rule] = RULES) -> Decision:
    holds: list[str] = []
    for rule in rules:
        decision = rule(ctx)
        if decision is None:
            continue
        if decision.action is Action.HOLD:
            holds.extend(decision.reasons)
            continue
        return decision
    if holds:
        return Decision(Action.HOLD, tuple(holds))
    return ACCEPT
