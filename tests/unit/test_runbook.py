"""docs/runbook.md against the alert rules and the dashboard that point at it.

Every alert of conf/greenmail-rules.yml has a runbook_url naming a section of the runbook,
every section is an alert's, the dashboard's panel links land on sections too, and the
greenmail commands the runbook tells an operator to run exist.
"""

from __future__ import annotations

import re
import shlex

import click
import promtool_support as pt
import support

from greenmail.cli import main as cli

RUNBOOK = support.ROOT / "docs" / "runbook.md"
# The base of every runbook_url in the rules (operators replace it, see the rules file's header).
BASE = "docs/runbook.md"


def anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def sections() -> dict[str, str]:
    """Anchor -> text of every ``##`` section of the runbook."""
    parts = re.split(r"^## (.+)$", RUNBOOK.read_text(), flags=re.M)
    return {anchor(title): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def alerts() -> dict[str, str | None]:
    """Alert name -> its runbook_url (None if it has none), read from the rules file.

    The file is plain block YAML, one ``- alert:`` or ``- record:`` item per rule (there is no
    YAML parser among the dependencies); the count is checked against the ``alert:`` lines."""
    text = pt.RULES.read_text()
    out: dict[str, str | None] = {}
    for block in re.split(r"^\s*- (?=alert:|record:)", text, flags=re.M)[1:]:
        name = re.match(r"alert:\s*(\w+)", block)
        if name:
            url = re.search(r"^\s+runbook_url:\s*\"?([^\"\n]+)\"?\s*$", block, re.M)
            out[name.group(1)] = url.group(1) if url else None
    assert len(out) == len(re.findall(r"^\s*- alert:", text, re.M))
    return out


def test_every_alert_has_a_runbook_section() -> None:
    found = sections()
    rules = alerts()
    assert len(rules) == 10
    for name, url in rules.items():
        assert url == f"{BASE}#{name.lower()}", (name, url)
        assert url.split("#", 1)[1] in found, f"{name}: no '## {name}' in {RUNBOOK}"
    assert set(found) == {n.lower() for n in rules}, "a runbook section without its alert"


def test_every_section_says_what_to_check_and_do() -> None:
    for name, body in sections().items():
        for part in ("**What it means.**", "**What to check.**", "**What to do.**"):
            assert part in body, (name, part)


def test_the_dashboard_links_panels_to_the_runbook() -> None:
    d = pt.dashboard()
    found = sections()
    base = next(v for v in d["templating"]["list"] if v["name"] == "runbook_base")
    assert base["type"] == "constant" and base["query"] == "${VAR_RUNBOOK_BASE}"
    inputs = {i["name"]: i for i in d["__inputs"]}
    assert inputs["VAR_RUNBOOK_BASE"]["type"] == "constant" and inputs["VAR_RUNBOOK_BASE"]["value"] == BASE
    linked = set()
    for p in d["panels"]:
        for link in p.get("links", []):
            prefix, _, target = link["url"].partition("#")
            assert prefix == "${runbook_base}" and target in found, (p["title"], link)
            assert link["title"].lower() == f"runbook: {target}", (p["title"], link)
            linked.add(target)
    assert linked == set(found), "an alert with no panel linking to its runbook section"


def test_the_runbook_commands_exist() -> None:
    commands = re.findall(r"`(greenmail [^`]+)`", RUNBOOK.read_text())
    assert len(commands) > 10
    for command in commands:
        words = [w for w in shlex.split(command)[1:] if not w.startswith("-")]
        group: click.Command = cli
        for word in words:
            if not isinstance(group, click.Group) or word.isupper():  # ID, a placeholder
                break
            sub = group.get_command(click.Context(group), word)
            assert sub is not None, f"{command!r}: no {word!r} command"
            group = sub
        options = [w.split("=")[0] for w in shlex.split(command) if w.startswith("--")]
        names = {o for p in group.params for o in p.opts}
        assert set(options) <= names, (command, set(options) - names)
