"""The demo's own check, as CI's last word on the stack: `rayline demo` traffic (5,000
now-stamped events/s from 32 concurrent requests, for 60 s) right after every other
integration test, on the state they left, counts every event with the default
lateness."""

from __future__ import annotations

import re

import pytest

from cluster.settings import Settings
from tests.integration.conftest import rayline


@pytest.mark.after_others
def test_the_demo_counts_every_event_after_the_other_tests(stack: Settings) -> None:
    result = rayline("demo", "--rate", "5000", "--duration", "60", "--then", "keep", timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "every event counted" in output, output[-4000:]
    sent = re.search(r"every event counted: sent ([\d,]+)", output)
    assert sent is not None, output[-4000:]
    assert int(sent.group(1).replace(",", "")) >= 5000 * 60 * 0.9  # the rate was kept
