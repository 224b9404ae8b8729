"""The man pages in docs/man: they render without a warning, and they name what the code has.

greenmail(8) against the click command tree (every command and option), the sendmail option
letters, the program names, signals, exit codes, environment variables and spool directories;
greenmail.toml(5) against the configuration schema (every section and key, each default).
A command, option or key added without its documentation fails here.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import click
import pytest
import support

from greenmail import cli, confcheck, config, entry, layout, reload, sendmail

MAN = support.ROOT / "docs" / "man"
PAGE8 = MAN / "greenmail.8"
PAGE5 = MAN / "greenmail.toml.5"
SOURCES = sorted((support.ROOT / "greenmail").glob("*.py"))

# --- reading roff -------------------------------------------------------------------------------

_ESCAPES = {
    r"\-": "-",
    r"\(dq": '"',
    r"\(lq": '"',
    r"\(rq": '"',
    r"\(bu": "*",
    r"\(em": "--",
    r"\(>=": ">=",
    r"\e": "\\",
    r"\&": "",
    r"\c": "",
}
_FONT = re.compile(r"\\f[BIRP]")
_ARG = re.compile(r'"((?:[^"]|"")*)"|(\S+)')
BOUNDARY = "\x00"  # where the font changes: a word of the rendered page ends there


def unescape(text: str) -> str:
    """Roff text as it reads, each font change a BOUNDARY."""
    text = _FONT.sub(BOUNDARY, text)
    for escape, plain in _ESCAPES.items():
        text = text.replace(escape, plain)
    return text


def macro_args(line: str) -> list[str]:
    """The arguments of a macro line (``.BR a " = " b`` -> ["a", " = ", "b"]), unescaped."""
    _, _, rest = line.partition(" ")
    return [unescape(q.replace('""', '"') if q or not bare else bare) for q, bare in _ARG.findall(rest)]


def text(line: str) -> str:
    """What one source line puts on the page (font macros' arguments, text lines as they are)."""
    if line.startswith('.\\"'):
        return ""
    if line.startswith("."):
        return BOUNDARY.join(macro_args(line))
    return unescape(line)


def read(page: Path) -> list[str]:
    return page.read_text(encoding="utf-8").splitlines()


def blocks(lines: list[str], macro: str) -> dict[str, list[str]]:
    """The lines under each heading of ``macro`` (.SH or .SS), up to the next heading of that level
    (a .SS block also ends at the next .SH)."""
    ends = (".SH",) if macro == ".SH" else (".SH", ".SS")
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        word = line.split(" ", 1)[0]
        if word == macro:
            current = out.setdefault(" ".join(macro_args(line)).replace(BOUNDARY, ""), [])
        elif word in ends:
            current = None
        elif current is not None:
            current.append(line)
    return out


def tags(lines: list[str]) -> list[list[str]]:
    """The tag (macro arguments) of every .TP paragraph."""
    return [macro_args(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line == ".TP"]


def words(lines: list[str]) -> str:
    return BOUNDARY.join(text(line) for line in lines)


def mentions(haystack: str, word: str) -> bool:
    """``word`` stands on its own in the page (``--all`` is not found in ``--all-failed``)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", haystack) is not None


def section(page: Path, name: str) -> list[str]:
    found = blocks(read(page), ".SH")
    assert name in found, f"{page.name}: no .SH {name}"
    return found[name]


# --- both pages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [PAGE8, PAGE5], ids=lambda p: p.name)
def test_page_renders_without_warnings(page: Path) -> None:
    groff = support.need_tool("groff", "groff-base")
    r = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, timeout=60, check=False
    )
    assert r.returncode == 0 and r.stderr.decode() == "", r.stderr.decode()


@pytest.mark.parametrize("page", [PAGE8, PAGE5], ids=lambda p: p.name)
def test_page_has_a_whatis_entry(page: Path) -> None:
    """man-db's parser reads the NAME line (what ``whatis`` and ``apropos`` show)."""
    lexgrog = support.need_tool("lexgrog", "man-db")
    r = subprocess.run([lexgrog, str(page)], capture_output=True, timeout=60, check=False)
    name = page.name.rsplit(".", 1)[0]
    assert r.returncode == 0 and f'"{name} - ' in r.stdout.decode(), r.stdout.decode() + r.stderr.decode()


@pytest.mark.parametrize("page", [PAGE8, PAGE5], ids=lambda p: p.name)
def test_title_line_names_page_section_date_and_version(page: Path) -> None:
    version = tomllib.loads((support.ROOT / "pyproject.toml").read_text())["project"]["version"]
    title = next(line for line in read(page) if line.startswith(".TH "))
    name, number = page.name.rsplit(".", 1)
    assert macro_args(title)[:3] == [name.upper(), number, "2026-12-03"]
    assert macro_args(title)[3] == f"greenmail {version}"


# --- greenmail(8) -------------------------------------------------------------------------------


def command_tree(
    group: click.Group, path: tuple[str, ...] = ()
) -> typing.Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from command_tree(command, (*path, name))


COMMANDS = list(command_tree(cli.main))
LEAVES = [(path, c) for path, c in COMMANDS if not isinstance(c, click.Group)]


def option_names(command: click.Command) -> list[str]:
    """Every option's spellings (hidden ones too), but --help, which OPTIONS documents once."""
    names = []
    for param in command.params:
        if isinstance(param, click.Option):
            names += [n for n in (*param.opts, *param.secondary_opts) if n != "--help"]
    return names


def test_the_command_tree_is_walked() -> None:
    """The walk itself finds nested commands and their options (else every test below is vacuous)."""
    paths = {" ".join(path) for path, _ in LEAVES}
    assert {"run", "queue list", "relay test", "config check", "user add", "sendmail"} <= paths
    assert "--once" in option_names(dict(LEAVES)[("run",)])


@pytest.mark.parametrize("path,command", LEAVES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_command_has_its_subsection_with_every_option(path: tuple[str, ...], command) -> None:
    heading = "greenmail " + " ".join(path)
    commands = blocks(section(PAGE8, "COMMANDS"), ".SS")
    assert heading in commands, f"greenmail.8: no .SS {heading} under COMMANDS"
    body = words(commands[heading])
    missing = [name for name in option_names(command) if not mentions(body, name)]
    assert not missing, f"greenmail.8, {heading}: options not documented: {missing}"
    for param in command.params:
        if isinstance(param, click.Argument) and param.nargs == 1:
            assert mentions(body.lower(), param.name.lower()), f"{heading}: argument {param.name}"


@pytest.mark.parametrize("path,command", LEAVES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_command_is_in_the_synopsis(path: tuple[str, ...], command) -> None:
    synopsis = words(section(PAGE8, "SYNOPSIS"))
    assert mentions(synopsis, path[-1]), f"greenmail.8 SYNOPSIS: no {' '.join(path)}"


def test_the_group_options_are_documented() -> None:
    options = words(section(PAGE8, "OPTIONS"))
    names = [*option_names(cli.main), "--help"]
    assert all(mentions(options, n) for n in names), names
    subsections = blocks(section(PAGE8, "COMMANDS"), ".SS")
    for path, group in COMMANDS:  # a group's own options: in the subsections of its commands
        if isinstance(group, click.Group):
            prefix = "greenmail " + " ".join(path) + " "
            under = words([line for h, b in subsections.items() if h.startswith(prefix) for line in b])
            missing = [n for n in option_names(group) if not mentions(under, n)]
            assert not missing, f"greenmail.8: options of {' '.join(path)} not documented: {missing}"


def test_every_sendmail_option_letter_is_documented() -> None:
    body = words(section(PAGE8, "SENDMAIL COMPATIBILITY"))
    letters = (sendmail._WITH_ARG - {"b"}) | sendmail._IGNORED | set("tiIq")
    spelled = [f"-{letter}" for letter in sorted(letters)] + [f"-b{m}" for m in sorted(sendmail._MODES)]
    refused = [a for a in ("-bd", "-bD") if _refused(a)]
    missing = [o for o in [*spelled, *refused, "-oi", "--config"] if not mentions(body, o)]
    assert not missing, f"greenmail.8 SENDMAIL COMPATIBILITY: not documented: {missing}"


def _refused(option: str) -> bool:
    try:
        sendmail.parse([option])
    except sendmail.UsageError:
        return True
    return False


def test_every_program_name_is_documented() -> None:
    """The names entry.py dispatches on (sendmail, mailq, newaliases) have a tag and a synopsis line."""
    source = Path(entry.__file__).read_text()
    names = set(re.findall(r'name == "(\w+)"', source))
    assert {"sendmail", "mailq", "newaliases"} <= names
    program_names = blocks(read(PAGE8), ".SS").get("Program names", [])
    documented = {t[0] for t in tags(program_names)}
    assert names <= documented, names - documented
    synopsis = words(section(PAGE8, "SYNOPSIS"))
    assert all(mentions(synopsis, n) for n in names)
    if '"--json" in args' in source:  # mailq --json: queue list --json
        assert re.search(r"mailq[\s\x00]+--json", words(program_names)), "mailq --json"


def _tag_words(lines: list[str]) -> set[str]:
    return {w for t in tags(lines) for w in re.split(r"[\s,\x00]+", "".join(t)) if w}


def test_every_signal_the_daemon_handles_is_documented() -> None:
    handled = set(
        re.findall(r"signal\.(SIG[A-Z0-9]+)", (support.ROOT / "greenmail" / "daemon.py").read_text())
    )
    assert {"SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1"} <= handled
    documented = _tag_words(section(PAGE8, "SIGNALS"))
    assert handled <= documented, handled - documented


def exit_codes_in_use() -> set[int]:
    """The EX_* constants of greenmail's modules that some code uses, beside 0, 1 (run) and 2 (click)."""
    sources = [path.read_text() for path in SOURCES]
    defined: dict[str, int] = {}
    definition = re.compile(r"^(EX_\w+(?:, EX_\w+)*) = (\d+(?:, \d+)*)$", re.M)
    for source in sources:
        for names, values in definition.findall(source):
            defined.update(zip(names.split(", "), map(int, values.split(", ")), strict=True))
    everything = "\n".join(sources)
    used = set()
    for name, value in defined.items():
        defining = sum(name in names.split(", ") for names, _ in definition.findall(everything))
        if len(re.findall(rf"\b{name}\b", everything)) > defining:
            used.add(value)
    assert {64, 65, 69, 73, 75, 78} <= used
    return {0, 1, 2} | used


def test_every_exit_code_in_use_is_documented_and_no_other() -> None:
    documented = {int(w) for w in _tag_words(section(PAGE8, "EXIT STATUS")) if w.isdigit()}
    assert documented == exit_codes_in_use()


def test_every_environment_variable_read_is_documented() -> None:
    read_vars = {config.ENV_VAR}
    for path in SOURCES:
        if path.name == "metrics.py":  # its environ is a WSGI request's (PATH_INFO), not the process's
            continue
        read_vars |= set(re.findall(r"(?:environ|env)\.get\(\"([A-Z][A-Z0-9_]*)\"", path.read_text()))
    assert {"GREENMAIL_CONFIG", "NOTIFY_SOCKET", "JOURNAL_STREAM"} <= read_vars
    documented = _tag_words(section(PAGE8, "ENVIRONMENT"))
    assert read_vars <= documented, read_vars - documented


def test_files_name_the_configuration_the_spool_its_directories_and_the_unit() -> None:
    files = section(PAGE8, "FILES")
    documented = _tag_words(files)
    expected = {str(p) for p in config.DEFAULT_PATHS} | {config.SYSTEM_SPOOL}
    expected |= {f"{d}/" for d in (*layout.DIRS, layout.MAILDROP)}
    assert expected <= documented, expected - documented
    unit = (support.ROOT / "conf" / "greenmail.service").name
    assert any(w.endswith("/" + unit) for w in documented), unit


# --- greenmail.toml(5) --------------------------------------------------------------------------

SECTION_TYPES = typing.get_type_hints(config.Config)


def key_entries() -> dict[str, dict[str, list[list[str]]]]:
    """Per ``.SS [section]`` of SECTIONS, each entry's tag arguments by key."""
    out: dict[str, dict[str, list[list[str]]]] = {}
    for heading, lines in blocks(section(PAGE5, "SECTIONS"), ".SS").items():
        m = re.fullmatch(r"\[(\w+)\]", heading)
        assert m, f"greenmail.toml.5: SECTIONS has a subsection that is not a [section]: {heading!r}"
        entries: dict[str, list[list[str]]] = {}
        for i, line in enumerate(lines[:-1]):
            if line == ".TP":
                tag = macro_args(lines[i + 1])
                body = []
                for later in lines[i + 2 :]:
                    if later == ".TP":
                        break
                    body.append(later)
                entries[tag[0]] = [tag, body]
        out[m.group(1)] = entries
    return out


def test_every_section_is_documented_and_no_other() -> None:
    assert set(key_entries()) == set(confcheck.SCHEMA)


@pytest.mark.parametrize("name", sorted(confcheck.SCHEMA))
def test_every_key_is_documented_under_its_section_and_no_other(name: str) -> None:
    documented = set(key_entries()[name])
    accepted = set(confcheck.SCHEMA[name])
    assert not accepted - documented, (
        f"greenmail.toml.5 [{name}]: keys not documented: {accepted - documented}"
    )
    assert not documented - accepted, (
        f"greenmail.toml.5 [{name}]: keys the loader rejects: {documented - accepted}"
    )


def defaults(name: str) -> dict[str, object]:
    return {f.name: MISSING if f.default is MISSING else f.default for f in fields(SECTION_TYPES[name])}


@pytest.mark.parametrize("name", sorted(confcheck.SCHEMA))
def test_every_documented_default_is_the_loaders(name: str) -> None:
    """A tag ``key = VALUE`` shows the default as TOML; a key without a constant default says "Default:"."""
    known = defaults(name)
    for key, (tag, body) in key_entries()[name].items():
        default = known[key]
        if len(tag) > 1:
            assert tag[1] == " = ", f"[{name}] {key}: tag {tag}"
            value = tomllib.loads("v = " + "".join(tag[2:]))["v"]
            expected = list(default) if isinstance(default, tuple) else default
            assert (
                value == expected
                and type(value) is type(expected)
                or (isinstance(value, int | float) and not isinstance(expected, bool) and value == expected)
            ), f"greenmail.toml.5 [{name}] {key}: documented default {value!r}, the loader's {default!r}"
            assert confcheck.SCHEMA[name][key](value) is None, f"[{name}] {key}: {value!r} is refused"
        else:
            assert default in (None, (), MISSING), (
                f"greenmail.toml.5 [{name}] {key}: the default {default!r} belongs in the tag"
            )
            assert "Default:" in words(body), f"greenmail.toml.5 [{name}] {key}: no Default: sentence"


def test_the_example_is_a_valid_configuration() -> None:
    lines = section(PAGE5, "EXAMPLE")
    start, end = lines.index(".EX"), lines.index(".EE")
    example = "\n".join(text(line).replace(BOUNDARY, "") for line in lines[start + 1 : end])
    cfg = config.from_dict(tomllib.loads(example), base=Path("/etc/greenmail"))
    assert cfg.relay.password_file == Path("/etc/greenmail/relay-password")


def test_the_settings_that_need_a_restart_are_named() -> None:
    body = words(section(PAGE5, "RELOADING"))
    for prefix in reload.RESTART:
        shown = f"[{prefix[:-1]}]" if prefix.endswith(".") else prefix
        assert mentions(body, shown), f"greenmail.toml.5 RELOADING: {shown}"
