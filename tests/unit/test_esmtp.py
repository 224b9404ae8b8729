"""greenmail.esmtp: SIZE, 8BITMIME and SMTPUTF8 as they bear on one message."""

from __future__ import annotations

import pytest

from greenmail import esmtp
from greenmail.protocol import Rcpt, Transaction

A, B = "a@example.net", "b@example.net"
UTF8 = "j\u00f6rg@example.net"
SENDER = "s@example.org"


@pytest.mark.parametrize(
    "extensions, limit",
    [
        ({}, 0),
        ({"SIZE": ""}, 0),
        ({"SIZE": "0"}, 0),
        ({"SIZE": "1000"}, 1000),
        ({"SIZE": " 52428800 "}, 52428800),
        ({"SIZE": "abc"}, 0),
        ({"SIZE": "-5"}, 0),
        ({"SIZE": "10.5"}, 0),
        ({"SIZE": "1000 extra"}, 0),
        ({"PIPELINING": "", "8BITMIME": ""}, 0),
        ({"SIZE": "\u00b2"}, 0),  # isdigit() but not an integer: a hostile relay must not crash us
    ],
)
def test_relay_size_limit(extensions: dict[str, str], limit: int) -> None:
    assert esmtp.relay_size_limit(extensions) == limit


def settled(txn: Transaction) -> dict[str, tuple[Rcpt, int]]:
    return {r: (res, txn.replies[r].code) for r, res in txn.results.items()}


@pytest.mark.parametrize(
    "extensions, size, sender, rcpts, utf8, refused",
    [
        # nothing to refuse
        ({}, 10**9, SENDER, (A, B), False, {}),
        ({"SIZE": "1000"}, 1000, SENDER, (A,), False, {}),  # exactly the limit is fine
        ({"SIZE": "0"}, 10**9, SENDER, (A,), False, {}),  # 0: no limit
        ({"SIZE": ""}, 10**9, SENDER, (A,), False, {}),
        # too big: every recipient fails, 552
        ({"SIZE": "1000"}, 1001, SENDER, (A, B), False, {A: 552, B: 552}),
        ({"SIZE": "1000", "SMTPUTF8": ""}, 5000, SENDER, (UTF8, A), False, {UTF8: 552, A: 552}),
        # non-ASCII without SMTPUTF8: only what needs it fails, 553
        ({}, 10, SENDER, (UTF8, A), False, {UTF8: 553}),
        ({}, 10, "s\u00e9@example.org", (A, B), False, {A: 553, B: 553}),
        # with SMTPUTF8: ask for it, refuse nothing
        ({"SMTPUTF8": ""}, 10, SENDER, (UTF8, A), True, {}),
        ({"SMTPUTF8": ""}, 10, "s\u00e9@example.org", (A,), True, {}),
        ({"SMTPUTF8": ""}, 10, SENDER, (A, B), False, {}),  # all ASCII: not needed
        ({}, 10, "", (A,), False, {}),  # the null sender
    ],
)
def test_precheck(
    extensions: dict[str, str],
    size: int,
    sender: str,
    rcpts: tuple[str, ...],
    utf8: bool,
    refused: dict[str, int],
) -> None:
    txn = Transaction(rcpts)
    assert esmtp.precheck(txn, extensions, size, sender) is utf8
    assert settled(txn) == {r: (Rcpt.FAILED, code) for r, code in refused.items()}
    assert txn.to_send == [r for r in rcpts if r not in refused]
    if refused:
        assert txn.error is not None and txn.error.code in refused.values()
        assert txn.error.cls == 5
    else:
        assert txn.error is None


def test_precheck_reasons_name_the_cause() -> None:
    txn = Transaction((A,))
    esmtp.precheck(txn, {"SIZE": "1000"}, 5000, SENDER)
    reply = txn.replies[A]
    assert reply.enhanced == "5.3.4"
    assert "size" in str(reply) and "5000" in str(reply) and "1000" in str(reply)
    txn = Transaction((UTF8,))
    esmtp.precheck(txn, {}, 10, SENDER)
    assert txn.replies[UTF8].enhanced == "5.6.7"
    assert "SMTPUTF8" in str(txn.replies[UTF8])


@pytest.mark.parametrize(
    "extensions, size, eight_bit, utf8, params",
    [
        ({}, 100, False, False, ""),
        ({}, 100, True, False, ""),  # 8-bit body but no 8BITMIME: no BODY= to a relay that cannot take it
        ({"SIZE": ""}, 100, False, False, " SIZE=100"),
        ({"SIZE": "5000"}, 1234, False, False, " SIZE=1234"),
        ({"8BITMIME": ""}, 100, True, False, " BODY=8BITMIME"),
        ({"8BITMIME": ""}, 100, False, False, ""),
        ({"SMTPUTF8": ""}, 100, False, True, " SMTPUTF8"),
        ({"SIZE": "", "8BITMIME": "", "SMTPUTF8": ""}, 7, True, True, " SIZE=7 BODY=8BITMIME SMTPUTF8"),
        ({"SIZE": "", "8BITMIME": "", "SMTPUTF8": ""}, 7, False, False, " SIZE=7"),
    ],
)
def test_mail_params(extensions: dict[str, str], size: int, eight_bit: bool, utf8: bool, params: str) -> None:
    assert esmtp.mail_params(extensions, size, eight_bit, utf8) == params
