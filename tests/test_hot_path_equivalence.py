"""The hot path's shortcuts give exactly what the slower reference gives."""

from __future__ import annotations

import math
import subprocess
import sys
from datetime import UTC, datetime
from email.utils import format_datetime

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from ess_async.identity import format_date
from ess_async.transports.smtp import dot_stuffed

_PIECES = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b" ", b"\r\n.",
                           b"\n.\n", b"\xc3\xa9", b"x" * 80])


@given(st.lists(_PIECES, max_size=40).map(b"".join))
def test_dot_stuffed_is_aiosmtplibs_normalisation_and_stuffing(raw: bytes) -> None:
    assert dot_stuffed(raw) == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(raw))


@given(st.binary(max_size=200))
def test_dot_stuffed_on_any_bytes(raw: bytes) -> None:
    assert dot_stuffed(raw) == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(raw))


@given(st.floats(min_value=-1e6, max_value=253402300799, allow_nan=False))
def test_format_date_is_the_email_packages(when: float) -> None:
    expected = format_datetime(datetime.fromtimestamp(math.floor(when), UTC))
    assert format_date(when) == expected
    assert format_date(when) == expected  # the cached answer too


def test_format_date_before_the_first_cached_second() -> None:
    """Found in review: the empty cache once answered "" for times in [-1, 0) (a fresh
    interpreter, so the cache is as at import)."""
    out = subprocess.run([sys.executable, "-c", "from ess_async.identity import format_date;"
                          " print(format_date(-0.5))"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == format_datetime(datetime.fromtimestamp(-1, UTC))


def test_format_date_changes_with_the_second() -> None:
    assert format_date(1_800_000_000.9) != format_date(1_800_000_001.0)
    assert format_date(1_800_000_000.0) == format_date(1_800_000_000.999)
