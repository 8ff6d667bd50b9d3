"""Bounce processing (-bounces, VERP, RFC 3464): see the bounces issue."""

from __future__ import annotations
