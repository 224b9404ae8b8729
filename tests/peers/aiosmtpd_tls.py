"""An aiosmtpd server with TLS and AUTH for the interop tests, run as a subprocess.

    python tests/peers/aiosmtpd_tls.py --port N --out DIR [--tls none|starttls|implicit]
        [--cert PEM --key PEM] [--require-starttls] [--client-ca PEM]
        [--auth USER:PASSWORD] [--auth-required] [--auth-plaintext]
        [--smtputf8] [--size BYTES] [--hostname NAME]

Listens on 127.0.0.1:N.  ``--tls starttls`` offers STARTTLS with the certificate;
``--tls implicit`` speaks TLS from the first byte (SMTPS); ``--tls none`` (the
default) offers no TLS.  ``--client-ca`` asks the client for a certificate
(optional) and records its subject.  ``--auth`` offers AUTH PLAIN, LOGIN and
CRAM-MD5 for that one user (only over TLS unless ``--auth-plaintext``);
``--auth-required`` refuses MAIL before a successful AUTH.

Output in DIR, each file replaced atomically:

* ``NNNNNN.eml``: a message as received (un-dot-stuffed), then ``NNNNNN.json``
  (mail_from, rcpt_tos, mail_options, rcpt_options, smtp_utf8, tls (protocol
  version or null), cipher, client_cert (subject CN or null), auth (login or
  null), peer_port, received_at (time.time()); the JSON is written last, so its presence means complete.
* ``sessions.json``: one entry per connection, rewritten after every command:
  {"peer_port", "tls" (at connect: implicit TLS), "commands": [[VERB, ARG, tls]]}
  where ARG is the argument (for AUTH only the mechanism, never credentials)
  and tls says whether the command came over TLS; plus "auth": ok|failed
  results in order.

Prints READY once listening; runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import secrets
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, auth_mechanism


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False, indent=1))
    os.replace(tmp, path)


class Recorder:
    """What every connection did, in DIR/sessions.json."""

    def __init__(self, out: Path) -> None:
        self.path = out / "sessions.json"
        self.sessions: list[dict[str, Any]] = []
        self.flush()

    def new(self, peer_port: int | None, tls: bool) -> dict[str, Any]:
        s: dict[str, Any] = {"peer_port": peer_port, "tls": tls, "commands": [], "auth": []}
        self.sessions.append(s)
        self.flush()
        return s

    def flush(self) -> None:
        write_json(self.path, self.sessions)


class Handler:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.count = 0

    async def handle_EHLO(self, server: RecordingSMTP, session, envelope, hostname: str, responses):  # noqa: N802
        session.host_name = hostname
        if server.user is None:  # no --auth: no AUTH line at all (aiosmtpd would offer an empty one)
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        return responses

    async def handle_DATA(self, server: RecordingSMTP, session, envelope) -> str:  # noqa: N802
        self.count += 1
        name = f"{self.count:06d}"
        (self.out / f"{name}.eml").write_bytes(envelope.original_content)
        tls = server.ssl_object()
        cert = tls.getpeercert() if tls is not None else None
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),
            "rcpt_options": list(envelope.rcpt_options),
            "smtp_utf8": bool(envelope.smtp_utf8),
            "tls": tls.version() if tls is not None else None,
            "cipher": tls.cipher()[0] if tls is not None else None,
            "client_cert": _common_name(cert) if cert else None,
            "auth": session.login_data.decode() if isinstance(session.login_data, bytes) else None,
            "peer_port": session.peer[1] if session.peer else None,
            "received_at": time.time(),
        }
        write_json(self.out / f"{name}.json", meta)
        return "250 2.0.0 Ok: queued as " + name


def _common_name(cert: dict[str, Any]) -> str | None:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class RecordingSMTP(SMTP):
    recorder: Recorder
    user: bytes | None = None
    password: bytes | None = None
    implicit_tls = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record: dict[str, Any] | None = None
        for verb, method in list(self._smtp_methods.items()):
            self._smtp_methods[verb] = self._recording(verb, method)

    def ssl_object(self) -> ssl.SSLObject | None:
        return self.transport.get_extra_info("ssl_object") if self.transport is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.record is None:  # not the second call after STARTTLS
            peer = transport.get_extra_info("peername")
            self.record = self.recorder.new(peer[1] if peer else None, self.implicit_tls)
        super().connection_made(transport)

    def _recording(self, verb: str, method: Any) -> Any:
        async def wrapper(arg: str | None) -> None:
            assert self.record is not None
            shown = (arg or "").split(" ")[0] if verb == "AUTH" else arg
            self.record["commands"].append([verb, shown, self.ssl_object() is not None])
            self.recorder.flush()
            await method(arg)

        return wrapper

    def authenticate(self, data: Any) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self.user is not None
            and data.login == self.user
            and data.password == self.password
        )
        return self._auth_result(ok, data.login if ok else None)

    def _auth_result(self, ok: bool, login: bytes | None) -> AuthResult:
        assert self.record is not None
        self.record["auth"].append("ok" if ok else "failed")
        self.recorder.flush()
        if not ok:
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=LoginPassword(login or b"", b""))

    @auth_mechanism("CRAM-MD5")
    async def auth_CRAM_MD5(self, _: Any, args: list[str]) -> AuthResult:  # noqa: N802 - aiosmtpd's name
        if len(args) > 1:
            await self.push("501 5.5.4 CRAM-MD5 takes no initial response")
            return AuthResult(success=False, handled=True)
        challenge = f"<{secrets.randbelow(10**12)}.{os.getpid()}@aiosmtpd.test>".encode()
        response = await self.challenge_auth(challenge)
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        login, _, digest = bytes(response).rpartition(b" ")
        expected = hmac.new(self.password or b"", challenge, hashlib.md5).hexdigest().encode()
        ok = self.user is not None and login == self.user and hmac.compare_digest(digest, expected)
        return self._auth_result(ok, login if ok else None)


def tls_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    RecordingSMTP.recorder = Recorder(args.out)
    RecordingSMTP.implicit_tls = args.tls == "implicit"
    if args.auth:
        user, _, password = args.auth.partition(":")
        RecordingSMTP.user, RecordingSMTP.password = user.encode(), password.encode()
    handler = Handler(args.out)
    ctx = tls_context(args.cert, args.key, args.client_ca) if args.tls != "none" else None

    def factory() -> RecordingSMTP:
        kwargs: dict[str, Any] = {
            "hostname": args.hostname,
            "loop": loop,
            "enable_SMTPUTF8": args.smtputf8,
            "data_size_limit": args.size or None,
            # implicit TLS: everything is encrypted (aiosmtpd only knows about STARTTLS)
            "auth_require_tls": not (args.auth_plaintext or args.tls == "implicit"),
            "auth_required": args.auth_required,
        }
        if args.auth:
            kwargs["authenticator"] = lambda server, session, envelope, mech, data: server.authenticate(data)
        else:
            kwargs["auth_exclude_mechanism"] = ["PLAIN", "LOGIN", "CRAM-MD5"]
        if args.tls == "starttls":
            kwargs["tls_context"] = ctx
            kwargs["require_starttls"] = args.require_starttls
        return RecordingSMTP(handler, **kwargs)

    server = await loop.create_server(
        factory, "127.0.0.1", args.port, ssl=ctx if args.tls == "implicit" else None
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tls", choices=("none", "starttls", "implicit"), default="none")
    p.add_argument("--cert", type=Path)
    p.add_argument("--key", type=Path)
    p.add_argument("--client-ca", type=Path)
    p.add_argument("--require-starttls", action="store_true")
    p.add_argument("--auth", help="USER:PASSWORD")
    p.add_argument("--auth-required", action="store_true")
    p.add_argument("--auth-plaintext", action="store_true", help="offer AUTH without TLS too")
    p.add_argument("--smtputf8", action="store_true")
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--hostname", default="aiosmtpd.test")
    args = p.parse_args()
    if args.tls != "none" and not (args.cert and args.key):
        p.error("--tls starttls/implicit needs --cert and --key")
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
