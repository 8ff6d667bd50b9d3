"""Our DKIM signatures against an independent verifier, Perl's Mail::DKIM, through
`scripts/dkim_crosscheck.py`: sample posts rendered by the real pipeline, shared and
personalized (the fast path and full renders), relaxed and simple, must pass, and
their tampered copies (a changed body, an added From, Subject or List-Unsubscribe)
must fail. `.ci/run` installs Mail::DKIM (Debian: libmail-dkim-perl) where it can."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "dkim_crosscheck.py"


def _has_mail_dkim() -> bool:
    if not shutil.which("perl"):
        return False
    probe = subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(
    not _has_mail_dkim(),
    reason="Perl Mail::DKIM is not installed (apt-get install libmail-dkim-perl)",
)
def test_mail_dkim_verifies_our_signatures_and_rejects_tampered_copies() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120
    )
    lines = done.stdout.splitlines()
    bad = [line for line in lines if not line.startswith("ok ")]
    assert done.returncode == 0 and not bad, done.stderr + "\n".join(bad)
    passed = [line for line in lines if line.endswith("expected pass")]
    failed = [line for line in lines if line.endswith("expected fail")]
    # 4 samples x 2 canonicalizations x (1 shared + 3 personalized), 4 tamperings each
    assert len(passed) == 32 and len(failed) == 4 * 32
    assert any("personalized fast" in line for line in passed)
    assert any("personalized full render" in line for line in passed)
