"""Bounces: who bounced, how often, and what follows.

verp.py      NAME-bounces+TOKEN@: a MAC'd token naming one delivery (member and post)
dsn.py       our RFC 3464 reader
parse.py     dsn.py, then flufl.bounce's heuristics; vacation replies are no bounces
smtp.py      5xx refusals in our own delivery (recorded with the delivery results)
process.py   stored mail to the bounce addresses: attribute, score, or forward
score.py     scores, disable, warnings, unsubscribe, reset
reenable.py  a disabled member's reply turns delivery back on
task.py      the daemon's loop
"""

from __future__ import annotations
