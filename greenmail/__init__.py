"""greenmail: a mail delivery daemon on gevent."""

__version__ = "0.1.0"
