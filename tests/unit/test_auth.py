"""greenmail.auth: choosing a SASL mechanism and computing the client responses."""

from __future__ import annotations

import base64

import pytest

from greenmail import auth


@pytest.mark.parametrize(
    "advertised, preference, expected",
    [
        ("PLAIN LOGIN", ("PLAIN", "LOGIN"), "PLAIN"),
        ("PLAIN LOGIN", ("LOGIN", "PLAIN"), "LOGIN"),  # our preference, not the relay's order
        ("LOGIN PLAIN CRAM-MD5", ("CRAM-MD5", "PLAIN"), "CRAM-MD5"),
        ("plain login", ("PLAIN", "LOGIN"), "PLAIN"),  # keywords are case-insensitive
        ("Cram-Md5", ("CRAM-MD5",), "CRAM-MD5"),
        ("  LOGIN   PLAIN ", ("PLAIN",), "PLAIN"),
        ("LOGIN", ("PLAIN",), None),
        ("CRAM-MD5 DIGEST-MD5", ("PLAIN", "LOGIN"), None),
        ("", ("PLAIN", "LOGIN"), None),
        ("PLAINX LOGINX", ("PLAIN", "LOGIN"), None),  # whole words only
        ("XOAUTH2 GSSAPI LOGIN", ("PLAIN", "LOGIN"), "LOGIN"),
    ],
)
def test_choose(advertised: str, preference: tuple[str, ...], expected: str | None) -> None:
    assert auth.choose(advertised, preference) == expected


def test_plain_initial_response() -> None:
    got = auth.initial("PLAIN", "user", "s3cret pass")
    assert got == base64.b64encode(b"\0user\0s3cret pass").decode()
    assert base64.b64decode(got) == b"\x00user\x00s3cret pass"


def test_plain_initial_response_utf8() -> None:
    got = auth.initial("PLAIN", "j\u00f6rg", "p\u00e4ss")
    assert base64.b64decode(got) == b"\0" + "j\u00f6rg".encode() + b"\0" + "p\u00e4ss".encode()


@pytest.mark.parametrize("mech", ["LOGIN", "CRAM-MD5"])
def test_challenge_mechanisms_have_no_initial_response(mech: str) -> None:
    assert auth.initial(mech, "user", "pw") is None


def test_login_two_steps() -> None:
    user = auth.respond("LOGIN", 0, "VXNlcm5hbWU6", "user", "s3cret")
    password = auth.respond("LOGIN", 1, "UGFzc3dvcmQ6", "user", "s3cret")
    assert (user, password) == ("dXNlcg==", "czNjcmV0")
    assert base64.b64decode(user) == b"user"
    assert base64.b64decode(password) == b"s3cret"


def test_cram_md5_rfc2195_example() -> None:
    challenge = "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"
    got = auth.respond("CRAM-MD5", 0, challenge, "tim", "tanstaaftanstaaf")
    assert got == "dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
    assert base64.b64decode(got) == b"tim b913a602c7eda7a495b4e6e7334d3890"


def test_cram_md5_challenge_with_surrounding_space() -> None:
    challenge = "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"
    got = auth.respond("CRAM-MD5", 0, f" {challenge} ", "tim", "tanstaaftanstaaf")
    assert got == "dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"


def test_plain_takes_no_challenge() -> None:
    with pytest.raises(ValueError):
        auth.respond("PLAIN", 0, "", "user", "pw")
