"""Envelope address checks: what is refused, and the ASCII fast path agreeing with the full rule."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from greenmail import address
from greenmail.errors import AddressError


def full_rule_clean(addr: str) -> bool:
    """The rule as first written: no character that is whitespace, below 32 or DEL."""
    return not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in addr)


@given(st.text())
@example("a b@c")
@example("a\x7fb@c")
@example("a\x1fb@c")
@example("a\u00a0b@c")
@example("a\u2028b@c")
@example("a\u200bb@c")
@example("jörg@exämple.org")
def test_clean_agrees_with_the_full_rule(addr: str) -> None:
    assert address._clean(addr) == full_rule_clean(addr)


@pytest.mark.parametrize("bad", ["a b@c", "a\tb@c", "a\x00b@c", "a\x7fb@c", "a\u00a0b@c", "a\u3000b@c"])
def test_whitespace_and_control_characters_are_refused(bad: str) -> None:
    with pytest.raises(AddressError, match="whitespace or a control character"):
        address.check(bad)


@pytest.mark.parametrize("good", ["a@b", "first.last+tag@example.org", "jörg@exämple.org", "a\u200bb@c"])
def test_plain_and_utf8_addresses_pass(good: str) -> None:
    assert address.check(good) == good
