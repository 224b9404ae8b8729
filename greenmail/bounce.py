"""Delivery status notifications (RFC 3464) for failed and delayed recipients.

Owns: building the bytes of one multipart/report DSN: a human-readable
part, a message/delivery-status part (Reporting-MTA, Arrival-Date, and per
recipient Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code),
and the original message's headers as text/rfc822-headers.
Must not touch: the spool (the outbox enqueues what this builds), sockets.
"""

from __future__ import annotations

import email.utils
import io
import re
import secrets
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTPUTF8

MAX_HEADERS = 64 * 1024  # how much of the original header block is quoted
_STATUS = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True)
class Failure:
    recipient: str
    reply: str  # the relay's reply ("550 5.1.1 no such user"), or greenmail's reason
    remote_mta: str | None = None


def status_of(reply: str, action: str) -> str:
    """The RFC 3463 status: the relay's enhanced code when it gave one."""
    code = reply.split(" ", 1)[1] if reply[:3].isdigit() and " " in reply else reply
    m = _STATUS.match(code)
    if m:
        return m.group(1)
    if reply[:1] in "45" and reply[:3].isdigit():
        return f"{reply[0]}.0.0"
    return "5.0.0" if action == "failed" else "4.0.0"


def build(
    *,
    reporting_mta: str,
    original_sender: str,
    queue_id: str,
    arrival: float,
    failures: list[Failure],
    original_headers: bytes,
    action: str = "failed",
) -> bytes:
    """One DSN to ``original_sender`` about ``failures`` (action "failed" or "delayed")."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{original_sender}>"
    report["Subject"] = (
        "Undelivered Mail Returned to Sender" if action == "failed" else "Delayed Mail (still being retried)"
    )
    report["Date"] = email.utils.formatdate(localtime=True)
    report["Message-ID"] = f"<{queue_id}.{secrets.token_hex(4)}.dsn@{reporting_mta}>"
    report["Auto-Submitted"] = "auto-replied"
    text = _human(reporting_mta, queue_id, failures, action)
    report.attach(MIMEText(text, "plain", "us-ascii" if text.isascii() else "utf-8"))
    report.attach(_status_part(reporting_mta, queue_id, arrival, failures, action))
    quoted = original_headers[:MAX_HEADERS]
    headers = MIMEBase("text", "rfc822-headers", **({} if quoted.isascii() else {"charset": "utf-8"}))
    headers.set_payload(quoted.decode("ascii", "surrogateescape"))  # the original bytes, as they were
    if not quoted.isascii():
        headers["Content-Transfer-Encoding"] = "8bit"
    report.attach(headers)
    out = io.BytesIO()
    BytesGenerator(out, policy=SMTPUTF8).flatten(report)  # UTF-8 addresses and replies stay readable
    return out.getvalue()


def _human(mta: str, qid: str, failures: list[Failure], action: str) -> str:
    if action == "failed":
        lead = "could not be delivered to the recipients below: it failed permanently."
    else:
        lead = "has not been delivered yet to the recipients below; delivery is still being tried."
    lines = [f"This is the mail system at host {mta}.", "", f"Your message {lead}", ""]
    lines += [f"<{f.recipient}>: {f.reply}" for f in failures]
    lines += ["", f"Queue id: {qid}"]
    return "\n".join(lines) + "\n"


def _status_part(mta: str, qid: str, arrival: float, failures: list[Failure], action: str) -> Message:
    per_message = _group(
        ("Reporting-MTA", f"dns; {mta}"),
        ("X-Greenmail-Queue-ID", qid),
        ("Arrival-Date", email.utils.formatdate(arrival, localtime=True)),
    )
    groups = [per_message]
    for f in failures:
        fields = [
            ("Final-Recipient", f"rfc822; {f.recipient}"),
            ("Action", action),
            ("Status", status_of(f.reply, action)),
        ]
        if f.remote_mta:
            fields.append(("Remote-MTA", f"dns; {f.remote_mta}"))
        kind = "smtp" if f.reply[:3].isdigit() else "X-greenmail"
        fields.append(("Diagnostic-Code", f"{kind}; {f.reply}"))
        groups.append(_group(*fields))
    part = MIMEBase("message", "delivery-status")
    part.set_payload(groups)
    del part["MIME-Version"]
    return part


def _group(*fields: tuple[str, str]) -> Message:
    """One block of delivery-status fields (a header group)."""
    group = Message()
    for name, value in fields:
        group[name] = value
    return group


def header_block(head: bytes) -> bytes:
    """The header block at the start of ``head`` (a message's first bytes), without the blank line."""
    end = re.search(rb"\r?\n(\r?\n)", head)
    return head[: end.start(1)] if end else head


def original_headers(path: str, offset: int) -> bytes:
    """The header block of the queued message at ``path`` (body excluded), capped."""
    with open(path, "rb") as f:
        f.seek(offset)
        return header_block(f.read(MAX_HEADERS))
