"""The exception tree of greenmail.

Owns: every exception class the package raises on purpose.
Must not touch: anything else of greenmail (data only, imports nothing of it).
"""

from __future__ import annotations


class GreenmailError(Exception):
    """Base of every error greenmail raises on purpose."""


class ConfigError(GreenmailError):
    """The configuration is missing, unreadable or invalid; the message names the key."""


class AddressError(GreenmailError):
    """An envelope address is not acceptable."""


class EnqueueError(GreenmailError):
    """A message could not be put into the spool (nothing was left behind)."""


class SpoolError(GreenmailError):
    """A spool operation failed."""


class QueueUnavailable(SpoolError):
    """The shared queue's database cannot be reached now (try again later; nothing was lost)."""


class LeaseLost(SpoolError):
    """This node's claim on a message expired or was taken over: it must not go on sending it."""


class CorruptQueueFile(SpoolError):
    """A file in outgoing/ is not a valid queue file."""


class NotFound(SpoolError):
    """No message with that queue id."""


class MessageBusy(SpoolError):
    """The message is claimed by a session right now."""


class CommandError(GreenmailError, ValueError):
    """An SMTP command argument would inject CR, LF or NUL."""


class SmtpError(GreenmailError):
    """A failure of the SMTP conversation; ``stage`` names where it happened."""

    reason = "connection"

    def __init__(self, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage


class ProtocolError(SmtpError):
    """The relay sent something that is not a valid SMTP reply (or too much of it)."""

    reason = "protocol"


class SmtpTimeout(SmtpError):
    """A wait on the relay exceeded its timeout."""

    reason = "timeout"


class ConnectionLost(SmtpError):
    """The relay closed the connection or the socket failed."""

    reason = "connection"


class ConnectFailed(SmtpError):
    """Opening the connection failed; ``result`` is refused, timeout or error."""

    def __init__(self, message: str, result: str) -> None:
        super().__init__(message, stage="banner")
        self.result = result


class RelayRefused(SmtpError):
    """The relay refused the session (banner or HELO); no message is to blame."""

    reason = "temporary"


class LocalProtocolError(SmtpError):
    """greenmail tried an SMTP step the protocol does not allow now (a bug); the connection is poisoned."""

    reason = "protocol"


class TlsFailed(RelayRefused):
    """TLS could not be set up (handshake, verification, or STARTTLS missing when required)."""


class AuthFailed(RelayRefused):
    """Authentication was refused or impossible; no message is to blame."""
