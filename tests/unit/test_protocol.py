"""Unit tests for greenmail.protocol: the stage table and transaction settlement."""

from __future__ import annotations

import pytest

from greenmail.errors import ProtocolError
from greenmail.protocol import (
    HELO_FALLBACK,
    STAGES,
    TRANSITIONS,
    Action,
    Rcpt,
    Stage,
    Transaction,
    decide,
)
from greenmail.wire import Reply

P, F, D, X, A, B = (
    Action.PROCEED,
    Action.FAIL,
    Action.DEFER,
    Action.PROTOCOL,
    Action.ABORT,
    Action.FALLBACK,
)

# One representative code per reply class.
CODE = {1: 150, 2: 250, 3: 354, 4: 450, 5: 550}

# The full expected matrix: stage -> actions for reply classes 1..5.
EXPECTED: dict[Stage, tuple[Action, Action, Action, Action, Action]] = {
    #                 1xx 2xx 3xx 4xx 5xx
    Stage.BANNER: (X, P, X, A, A),
    Stage.HELO: (X, P, X, A, B),
    Stage.MAIL: (X, P, X, D, F),
    Stage.RCPT: (X, P, X, D, F),
    Stage.DATA: (X, X, P, D, F),
    Stage.MESSAGE: (X, P, X, D, F),
    Stage.STARTTLS: (X, P, X, A, A),
    Stage.AUTH: (X, P, Action.CONTINUE, A, A),
}

MATRIX = [
    pytest.param(stage, cls, EXPECTED[stage][cls - 1], id=f"{stage.label}-{cls}xx")
    for stage in Stage
    for cls in range(1, 6)
]


def r(code: int, text: str = "text") -> Reply:
    return Reply(code, (text,))


# --------------------------------------------------------------------------- stages and decide()


def test_stage_labels_and_order() -> None:
    assert STAGES == ("banner", "helo", "mail", "rcpt", "data", "message", "starttls", "auth")
    assert [int(s) for s in Stage] == [0, 1, 2, 3, 4, 5, 6, 7]
    for i, label in enumerate(STAGES):
        assert Stage(i).label == label
        assert STAGES[Stage(i)] == label


def test_expected_matrix_covers_every_stage() -> None:
    assert set(EXPECTED) == set(Stage)


@pytest.mark.parametrize(("stage", "cls", "action"), MATRIX)
def test_decide_matrix(stage: Stage, cls: int, action: Action) -> None:
    assert decide(stage, r(CODE[cls])) is action


@pytest.mark.parametrize(("stage", "cls", "action"), MATRIX)
@pytest.mark.parametrize("offset", [0, 1, 21, 99])
def test_decide_depends_only_on_the_reply_class(stage: Stage, cls: int, action: Action, offset: int) -> None:
    code = cls * 100 + offset
    assert decide(stage, Reply(code)) is action
    assert decide(stage, Reply(code, ("a", "b"))) is action


@pytest.mark.parametrize("code", [0, 99, 600, 699, 999])
@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: s.label)
def test_decide_out_of_range_codes_are_protocol(stage: Stage, code: int) -> None:
    assert decide(stage, Reply(code)) is Action.PROTOCOL


def test_transitions_table_has_no_entries_beyond_the_matrix() -> None:
    explicit = {(s, c): a for s in Stage for c, a in enumerate(EXPECTED[s], start=1) if a is not X}
    assert explicit == TRANSITIONS


@pytest.mark.parametrize(
    ("cls", "action"),
    [(2, Action.PROCEED), (4, Action.ABORT), (5, Action.ABORT)],
)
def test_helo_fallback(cls: int, action: Action) -> None:
    assert HELO_FALLBACK[cls] is action


def test_helo_fallback_has_no_other_classes() -> None:
    assert set(HELO_FALLBACK) == {2, 4, 5}


# --------------------------------------------------------------------------- Transaction


RCPTS = ("a@x", "b@x", "c@x")


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (421, Rcpt.DEFERRED),
        (450, Rcpt.DEFERRED),
        (451, Rcpt.DEFERRED),
        (550, Rcpt.FAILED),
        (553, Rcpt.FAILED),
    ],
)
def test_mail_refusal_settles_every_recipient(code: int, state: Rcpt) -> None:
    t = Transaction(RCPTS)
    reply = r(code, "no")
    assert t.on_mail(reply) is False
    assert t.results == dict.fromkeys(RCPTS, state)
    assert t.replies == dict.fromkeys(RCPTS, reply)
    assert t.error == reply
    assert t.count(state) == 3
    assert t.count(Rcpt.DELIVERED) == 0
    assert not t.wants_data


def test_mail_accepted_goes_on() -> None:
    t = Transaction(RCPTS)
    assert t.on_mail(r(250)) is True
    assert t.results == {}
    assert t.error is None


def test_rcpt_mix_then_delivery() -> None:
    t = Transaction(RCPTS)
    ok, later, never = r(250, "ok"), r(450, "4.2.1 later"), r(550, "5.1.1 no such user")
    final = r(250, "2.0.0 queued as X")
    assert t.on_mail(r(250)) is True
    t.on_rcpt("a@x", ok)
    t.on_rcpt("b@x", later)
    t.on_rcpt("c@x", never)
    assert t.accepted == ["a@x"]
    assert t.wants_data
    assert t.on_data(r(354, "go ahead")) is True
    t.on_message(final)
    assert t.results == {"a@x": Rcpt.DELIVERED, "b@x": Rcpt.DEFERRED, "c@x": Rcpt.FAILED}
    assert t.replies == {"a@x": final, "b@x": later, "c@x": never}
    assert (t.count(Rcpt.DELIVERED), t.count(Rcpt.DEFERRED), t.count(Rcpt.FAILED)) == (1, 1, 1)
    assert t.count(Rcpt.PENDING) == 0
    # The last refusal decided the error; the delivery does not clear it.
    assert t.error == never


def test_all_accepted_and_delivered() -> None:
    t = Transaction(RCPTS)
    final = r(250, "ok")
    t.on_mail(r(250))
    for rcpt in RCPTS:
        t.on_rcpt(rcpt, r(250))
    assert t.accepted == list(RCPTS)
    assert t.on_data(r(354)) is True
    t.on_message(final)
    assert t.results == dict.fromkeys(RCPTS, Rcpt.DELIVERED)
    assert t.replies == dict.fromkeys(RCPTS, final)
    assert t.count(Rcpt.DELIVERED) == 3
    assert t.error is None


@pytest.mark.parametrize(
    ("codes", "deferred", "failed"),
    [
        ((450, 450, 450), 3, 0),
        ((550, 550, 550), 0, 3),
        ((450, 550, 451), 2, 1),
    ],
)
def test_no_accepted_recipient_wants_no_data(codes: tuple[int, ...], deferred: int, failed: int) -> None:
    t = Transaction(RCPTS)
    t.on_mail(r(250))
    for rcpt, code in zip(RCPTS, codes, strict=True):
        t.on_rcpt(rcpt, r(code))
    assert t.wants_data is False
    assert t.accepted == []
    assert t.count(Rcpt.DEFERRED) == deferred
    assert t.count(Rcpt.FAILED) == failed
    assert t.error == r(codes[-1])


def test_fresh_transaction_wants_no_data() -> None:
    t = Transaction(RCPTS)
    assert t.wants_data is False
    assert t.error is None
    assert all(t.count(s) == 0 for s in Rcpt)


def _two_accepted_one_failed() -> Transaction:
    t = Transaction(RCPTS)
    t.on_mail(r(250))
    t.on_rcpt("a@x", r(250))
    t.on_rcpt("b@x", r(550, "rcpt refused"))
    t.on_rcpt("c@x", r(251, "will forward"))
    assert t.accepted == ["a@x", "c@x"]
    return t


@pytest.mark.parametrize(("code", "state"), [(421, Rcpt.DEFERRED), (451, Rcpt.DEFERRED), (554, Rcpt.FAILED)])
def test_data_refusal_applies_to_every_accepted_recipient(code: int, state: Rcpt) -> None:
    t = _two_accepted_one_failed()
    reply = r(code, "data refused")
    assert t.on_data(reply) is False
    assert t.results == {"a@x": state, "b@x": Rcpt.FAILED, "c@x": state}
    assert t.replies["a@x"] == reply
    assert t.replies["c@x"] == reply
    assert t.replies["b@x"] == r(550, "rcpt refused")
    assert t.error == reply


@pytest.mark.parametrize(("code", "state"), [(451, Rcpt.DEFERRED), (452, Rcpt.DEFERRED), (552, Rcpt.FAILED)])
def test_final_refusal_applies_to_every_accepted_recipient(code: int, state: Rcpt) -> None:
    t = _two_accepted_one_failed()
    assert t.on_data(r(354)) is True
    reply = r(code, "message refused")
    t.on_message(reply)
    assert t.results == {"a@x": state, "b@x": Rcpt.FAILED, "c@x": state}
    assert t.replies == {"a@x": reply, "b@x": r(550, "rcpt refused"), "c@x": reply}
    assert t.error == reply
    assert t.count(Rcpt.DELIVERED) == 0
    assert t.count(state) == (3 if state is Rcpt.FAILED else 2)


@pytest.mark.parametrize(
    ("feed", "stage"),
    [
        pytest.param(lambda t: t.on_mail(r(354)), "mail", id="mail-354"),
        pytest.param(lambda t: t.on_mail(r(150)), "mail", id="mail-150"),
        pytest.param(lambda t: (t.on_mail(r(250)), t.on_rcpt("a@x", r(354))), "rcpt", id="rcpt-354"),
        pytest.param(lambda t: (t.on_mail(r(250)), t.on_rcpt("a@x", r(150))), "rcpt", id="rcpt-150"),
        pytest.param(
            lambda t: (t.on_mail(r(250)), t.on_rcpt("a@x", r(250)), t.on_data(r(250))), "data", id="data-250"
        ),
        pytest.param(
            lambda t: (t.on_mail(r(250)), t.on_rcpt("a@x", r(250)), t.on_data(r(150))), "data", id="data-150"
        ),
        pytest.param(
            lambda t: (t.on_mail(r(250)), t.on_rcpt("a@x", r(250)), t.on_data(r(354)), t.on_message(r(354))),
            "message",
            id="message-354",
        ),
    ],
)
def test_unexpected_reply_class_raises_protocol_error(feed, stage: str) -> None:
    t = Transaction(RCPTS)
    with pytest.raises(ProtocolError) as info:
        feed(t)
    assert info.value.stage == stage
    assert info.value.reason == "protocol"
    # Nobody is settled as delivered by a protocol violation.
    assert t.count(Rcpt.DELIVERED) == 0


@pytest.mark.parametrize(
    ("steps", "error"),
    [
        pytest.param([("mail", 451)], 451, id="mail"),
        pytest.param([("mail", 250), ("rcpt", 550), ("rcpt", 250), ("rcpt", 250)], 550, id="rcpt"),
        pytest.param([("mail", 250), ("rcpt", 450), ("rcpt", 550), ("rcpt", 250)], 550, id="last-rcpt-wins"),
        pytest.param(
            [("mail", 250), ("rcpt", 250), ("rcpt", 250), ("rcpt", 250), ("data", 554)], 554, id="data"
        ),
        pytest.param(
            [("mail", 250), ("rcpt", 550), ("rcpt", 250), ("rcpt", 250), ("data", 354), ("message", 452)],
            452,
            id="message-overrides-rcpt",
        ),
        pytest.param(
            [("mail", 250), ("rcpt", 250), ("rcpt", 250), ("rcpt", 250), ("data", 354), ("message", 250)],
            None,
            id="none",
        ),
    ],
)
def test_error_holds_the_deciding_reply(steps: list[tuple[str, int]], error: int | None) -> None:
    t = Transaction(RCPTS)
    rcpts = iter(RCPTS)
    for step, code in steps:
        reply = Reply(code, (f"{step} {code}",))
        if step == "rcpt":
            t.on_rcpt(next(rcpts), reply)
        else:
            getattr(t, f"on_{step}")(reply)
    if error is None:
        assert t.error is None
    else:
        assert t.error is not None
        assert t.error.code == error
        assert t.error.text.endswith(str(error))


def test_count_sums_to_recipients_once_settled() -> None:
    t = _two_accepted_one_failed()
    t.on_data(r(354))
    t.on_message(r(250))
    assert sum(t.count(s) for s in Rcpt) == len(RCPTS)
    assert t.count(Rcpt.DELIVERED) == 2
    assert t.count(Rcpt.FAILED) == 1
    assert t.count(Rcpt.DEFERRED) == 0
