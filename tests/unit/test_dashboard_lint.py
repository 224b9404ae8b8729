"""The rules of Grafana's dashboard-linter (github.com/grafana/dashboard-linter), on grafana/greenmail.json.

The linter is a Go program and not packaged for Debian, so its rules are written here again,
each as a small function from the dashboard (parsed JSON) to a list of violations (empty:
the rule holds). Each rule is run on the real dashboard (no violation) and on deliberately
broken copies of it (at least one violation each), so every rule is known to be able to fail.

Where this is stricter than the linter it says so: ``editable`` must be present and false
(Grafana treats a missing one as true), the job and instance variables must also offer "All",
the instance variable must follow $job, and ``increase`` counts as a rate function.

PromQL is read with a small scanner (``selectors``, ``range_functions``) that understands what
the dashboard's queries use: selectors with matchers, functions, aggregations with by/without,
binary operators, numbers and range selectors. The real parser (promtool) checks the same
queries in tests/unit/test_metrics.py and a real Prometheus runs them in
tests/e2e/test_observability.py.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import promtool_support as pt
import pytest

Dashboard = dict[str, Any]
Violations = list[str]

# -- the dashboard's parts -------------------------------------------------------------------


def panels(d: Dashboard) -> Iterator[dict[str, Any]]:
    """Every panel but rows, including those inside collapsed rows."""
    for p in d.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def targets(d: Dashboard) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every PromQL target."""
    for p in panels(d):
        for t in p.get("targets", []):
            if "expr" in t:
                yield p, t


def variables(d: Dashboard) -> list[dict[str, Any]]:
    return d.get("templating", {}).get("list", [])


def variable(d: Dashboard, name: str) -> dict[str, Any] | None:
    return next((v for v in variables(d) if v.get("name") == name), None)


def where(p: dict[str, Any], t: dict[str, Any] | None = None) -> str:
    return f"panel {p.get('title')!r}" + (f" target {t.get('refId')}" if t else "")


# -- PromQL, scanned ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Matcher:
    name: str
    op: str  # =, !=, =~ or !~
    value: str


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(
    r"(?P<braces>\{[^}]*\})|(?P<range>\[[^\]]*\])|(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\w*)"
    r"|(?P<ident>[A-Za-z_:][\w:]*)"
)
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}


def _scannable(expr: str) -> str:
    """``expr`` with string contents and grouping clauses blanked, offsets unchanged."""
    s = pt.blank_strings(expr)
    return _GROUPING.sub(lambda m: " " * len(m.group()), s)


def _matchers(text: str) -> list[Matcher]:
    """The matchers of one ``{...}`` (its inside, from the original expression)."""
    out, pos = [], 0
    while pos < len(text) and text[pos:].strip():
        m = _MATCHER.match(text, pos)
        assert m, f"cannot read the matchers {text!r}"
        out.append(Matcher(m.group(1), m.group(2), re.sub(r"\\(.)", r"\1", m.group(3))))
        pos = m.end()
    return out


def selectors(expr: str) -> list[tuple[str, list[Matcher]]]:
    """(metric name or "", matchers) of every vector selector of ``expr``."""
    s = _scannable(expr)
    out: list[tuple[str, list[Matcher]]] = []
    tokens = list(_TOKEN.finditer(s))
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.lastgroup == "braces":  # {...} without a name
            out.append(("", _matchers(expr[tok.start() + 1 : tok.end() - 1])))
        elif tok.lastgroup == "ident" and tok.group() not in KEYWORDS:
            if s[tok.end() :].lstrip().startswith("("):  # a function or an aggregation
                i += 1
                continue
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            if following and following.lastgroup == "braces" and not s[tok.end() : following.start()].strip():
                out.append((tok.group(), _matchers(expr[following.start() + 1 : following.end() - 1])))
                i += 1
            else:
                out.append((tok.group(), []))
        i += 1
    return out


def range_functions(expr: str) -> list[tuple[str, str]]:
    """(enclosing function, range) of every range selector ``[...]`` (subqueries left out)."""
    s = _scannable(expr)
    out = []
    for m in re.finditer(r"\[([^\]]*)\]", s):
        if ":" not in m.group(1):
            out.append((pt.enclosing_function(s, m.start()), m.group(1).strip()))
    return out


# -- the rules ---------------------------------------------------------------------------------

TEMPLATED_DATASOURCE = {"$datasource", "${datasource}"}


def template_datasource(d: Dashboard) -> Violations:
    """template-datasource: a data source variable for Prometheus, named and labelled as the
    linter wants ("datasource" / "Data source" when it is the only one, else
    "prometheus_datasource" / "Prometheus data source")."""
    found = [v for v in variables(d) if v.get("type") == "datasource"]
    if not found:
        return ["the dashboard has no templated data source"]
    out = []
    for v in found:
        query = str(v.get("query", ""))
        if query != "prometheus":
            out.append(f"data source variable {v.get('name')!r} is for {query!r}, not prometheus")
        names, labels = {f"{query.lower()}_datasource"}, {f"{query.title()} data source"}
        if len(found) == 1:
            names.add("datasource")
            labels.add("Data source")
        if v.get("name") not in names:
            out.append(f"data source variable named {v.get('name')!r}, should be one of {sorted(names)}")
        if v.get("label") not in labels:
            out.append(f"data source variable labelled {v.get('label')!r}, should be one of {sorted(labels)}")
    return out


def panel_datasource(d: Dashboard) -> Violations:
    """panel-datasource: every panel and every target queries the templated data source."""
    allowed = {f"${v['name']}" for v in variables(d) if v.get("type") == "datasource"}
    allowed |= {f"${{{v['name']}}}" for v in variables(d) if v.get("type") == "datasource"}
    out = []
    for p in panels(d):
        for item, label in [(p, where(p))] + [(t, where(p, t)) for t in p.get("targets", [])]:
            uid = (item.get("datasource") or {}).get("uid")
            if uid not in allowed:
                out.append(f"{label} uses data source {uid!r}, not a templated one {sorted(allowed)}")
    return out


def _template(d: Dashboard, name: str) -> Violations:
    """What the linter asks of the job and instance variables, plus "All"."""
    v = variable(d, name)
    if v is None:
        return [f"the dashboard has no {name} variable"]
    out = []
    uid = (v.get("datasource") or {}).get("uid")
    if uid not in TEMPLATED_DATASOURCE:
        out.append(f"{name} variable uses data source {uid!r}, should be $datasource")
    if v.get("type") != "query":
        out.append(f"{name} variable is of type {v.get('type')!r}, should be a query")
    if v.get("label") != name.title():
        out.append(f"{name} variable is labelled {v.get('label')!r}, should be {name.title()!r}")
    if v.get("multi") is not True:
        out.append(f"{name} variable should be a multi-select")
    if v.get("includeAll") is not True:
        out.append(f"{name} variable should offer All")
    if v.get("allValue") != ".+":
        out.append(f"{name} variable's allValue should be '.+', is {v.get('allValue')!r}")
    return out


def _variable_query(v: dict[str, Any]) -> str:
    q = v.get("query", "")
    return q.get("query", "") if isinstance(q, dict) else str(q)


def template_job(d: Dashboard) -> Violations:
    """template-job: a job variable, a multi-select Prometheus query with All (.+)."""
    return _template(d, "job")


def template_instance(d: Dashboard) -> Violations:
    """template-instance: the same for instance, whose values follow the chosen $job."""
    out = _template(d, "instance")
    v = variable(d, "instance")
    if v is not None and 'job=~"$job"' not in _variable_query(v):
        out.append(f'instance variable\'s query {_variable_query(v)!r} should select job=~"$job"')
    return out


def _target_matcher(d: Dashboard, label: str) -> Violations:
    wanted = Matcher(label, "=~", f"${label}")
    out = []
    for p, t in targets(d):
        for name, matchers in selectors(t["expr"]):
            if wanted not in matchers:
                out.append(f'{where(p, t)}: selector {name or "{}"} lacks {label}=~"${label}"')
    return out


def target_job(d: Dashboard) -> Violations:
    """target-job: every selector of every target has job=~"$job"."""
    return _target_matcher(d, "job")


def target_instance(d: Dashboard) -> Violations:
    """target-instance: every selector of every target has instance=~"$instance"."""
    return _target_matcher(d, "instance")


RATE_FUNCTIONS = {"rate", "irate", "increase"}


def target_rate_interval(d: Dashboard) -> Violations:
    """target-rate-interval: rate, irate and increase take [$__rate_interval]."""
    out = []
    for p, t in targets(d):
        for function, window in range_functions(t["expr"]):
            if function in RATE_FUNCTIONS and window != "$__rate_interval":
                out.append(f"{where(p, t)}: {function}(...[{window}]) should use [$__rate_interval]")
    return out


# Grafana's unit ids (packages/grafana-data/src/valueFormats/categories.ts), the common subset:
# a unit missing here that Grafana has may simply be added.
UNITS = {
    *("none", "string", "short", "percent", "percentunit", "sci", "locale", "hex", "hex0x"),
    *("ns", "µs", "ms", "s", "m", "h", "d", "dtdurationms", "dtdurations", "dthms", "clockms", "clocks"),
    *("hertz", "ops", "reqps", "rps", "wps", "iops", "cps", "opm", "rpm", "wpm", "cpm"),
    *("bytes", "decbytes", "bits", "decbits", "kbytes", "mbytes", "gbytes", "bps", "Bps", "binBps", "binbps"),
    *("dateTimeAsIso", "dateTimeAsLocal", "dateTimeAsSystem", "dateTimeFromNow"),
    *("bool", "bool_yes_no", "bool_on_off"),
}
# The panel types whose unit is fieldConfig's (the heatmap's is in its own options, left out).
UNIT_PANELS = {"graph", "timeseries", "stat", "singlestat", "gauge", "bargauge", "table"}


def panel_units(d: Dashboard) -> Violations:
    """panel-units: every graph, time series, stat, gauge and table panel has a known unit."""
    out = []
    for p in panels(d):
        if p.get("type") not in UNIT_PANELS:
            continue
        config = p.get("fieldConfig", {})
        unit = config.get("defaults", {}).get("unit")
        for override in config.get("overrides", []):
            for prop in override.get("properties", []):
                if prop.get("id") == "unit":
                    unit = prop.get("value")
        if unit not in UNITS:
            out.append(f"{where(p)} has no or an unknown unit: {unit!r}")
    return out


def uneditable_dashboard(d: Dashboard) -> Violations:
    """uneditable-dashboard: "editable": false (present: Grafana's default is editable)."""
    return [] if d.get("editable") is False else [f"editable is {d.get('editable')!r}, should be false"]


RULES: dict[str, Callable[[Dashboard], Violations]] = {
    "template-datasource": template_datasource,
    "panel-datasource": panel_datasource,
    "template-job": template_job,
    "template-instance": template_instance,
    "target-job": target_job,
    "target-instance": target_instance,
    "target-rate-interval": target_rate_interval,
    "panel-units": panel_units,
    "uneditable-dashboard": uneditable_dashboard,
}

# -- breaking a copy of the dashboard, one way at a time -----------------------------------------


def _panel(d: Dashboard, title: str) -> dict[str, Any]:
    return next(p for p in panels(d) if p["title"] == title)


def _first_target(d: Dashboard, title: str = "Spool by state") -> dict[str, Any]:
    return _panel(d, title)["targets"][0]


def _sub_expr(old: str, new: str, title: str = "Spool by state") -> Callable[[Dashboard], None]:
    def breaker(d: Dashboard) -> None:
        t = _first_target(d, title)
        assert old in t["expr"], t["expr"]
        t["expr"] = t["expr"].replace(old, new)

    return breaker


def _set(path: tuple[Any, ...], value: Any) -> Callable[[Dashboard], None]:
    """Set d[path...] = value; a str step that is a variable's name picks that variable."""

    def breaker(d: Dashboard) -> None:
        node: Any = d
        for step in path[:-1]:
            node = variable(d, step[4:]) if isinstance(step, str) and step.startswith("var:") else node[step]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return breaker


_DELETE = object()


def _drop_variable(name: str) -> Callable[[Dashboard], None]:
    def breaker(d: Dashboard) -> None:
        d["templating"]["list"] = [v for v in variables(d) if v["name"] != name]

    return breaker


def _second_datasource(d: Dashboard) -> None:
    d["templating"]["list"].append({"type": "datasource", "name": "loki", "label": "Loki", "query": "loki"})


BREAKERS: list[tuple[str, str, Callable[[Dashboard], None]]] = [
    ("template-datasource", "no data source variable", _drop_variable("datasource")),
    ("template-datasource", "named otherwise", _set(("var:datasource", "name"), "ds")),
    ("template-datasource", "labelled otherwise", _set(("var:datasource", "label"), "Source")),
    ("template-datasource", "not Prometheus", _set(("var:datasource", "query"), "loki")),
    ("template-datasource", "a second, badly named one", _second_datasource),
    (
        "panel-datasource",
        "a panel's fixed uid",
        _set(("panels", 1, "datasource", "uid"), "P1809F7CD0C75ACF3"),
    ),
    (
        "panel-datasource",
        "a target's input",
        _set(("panels", 1, "targets", 0, "datasource", "uid"), "${DS_PROMETHEUS}"),
    ),
    ("template-job", "no job variable", _drop_variable("job")),
    ("template-job", "single-select", _set(("var:job", "multi"), False)),
    ("template-job", "without All", _set(("var:job", "includeAll"), False)),
    ("template-job", "allValue unset", _set(("var:job", "allValue"), _DELETE)),
    ("template-job", "fixed data source", _set(("var:job", "datasource", "uid"), "prom-1")),
    ("template-job", "a custom variable", _set(("var:job", "type"), "custom")),
    ("template-job", "labelled otherwise", _set(("var:job", "label"), "job")),
    ("template-instance", "no instance variable", _drop_variable("instance")),
    ("template-instance", "single-select", _set(("var:instance", "multi"), False)),
    ("template-instance", "allValue .*", _set(("var:instance", "allValue"), ".*")),
    (
        "template-instance",
        "not following $job",
        _set(("var:instance", "query", "query"), "label_values(greenmail_build_info, instance)"),
    ),
    ("target-job", "equality instead of regex", _sub_expr('job=~"$job"', 'job="$job"')),
    ("target-job", "no job matcher", _sub_expr('job=~"$job", ', "")),
    ("target-job", "a fixed job", _sub_expr('job=~"$job"', 'job=~"greenmail"')),
    (
        "target-job",
        "one selector of two without it",
        _sub_expr(
            'greenmail_connections_active{job=~"$job", instance=~"$instance"}',
            'greenmail_connections_active{job=~"$job", instance=~"$instance"}'
            ' / greenmail_connections_max{instance=~"$instance"}',
            "Connections active vs max",
        ),
    ),
    (
        "target-instance",
        "equality instead of regex",
        _sub_expr('instance=~"$instance"', 'instance="$instance"'),
    ),
    ("target-instance", "no matchers at all", _sub_expr('{job=~"$job", instance=~"$instance"}', "")),
    (
        "target-rate-interval",
        "rate over 5m",
        _sub_expr("[$__rate_interval]", "[5m]", "Delivery results rate"),
    ),
    (
        "target-rate-interval",
        "increase over $__interval",
        _sub_expr("[$__rate_interval]", "[$__interval]", "Delivery delay heatmap"),
    ),
    ("panel-units", "no unit", _set(("panels", 1, "fieldConfig", "defaults", "unit"), _DELETE)),
    ("panel-units", "an empty unit", _set(("panels", 1, "fieldConfig", "defaults", "unit"), "")),
    ("panel-units", "an unknown unit", _set(("panels", 1, "fieldConfig", "defaults", "unit"), "messages")),
    (
        "panel-units",
        "an override with an unknown unit",
        _set(
            ("panels", 1, "fieldConfig", "overrides"),
            [
                {
                    "matcher": {"id": "byName", "options": "held"},
                    "properties": [{"id": "unit", "value": "msg"}],
                }
            ],
        ),
    ),
    ("uneditable-dashboard", "editable", _set(("editable",), True)),
    ("uneditable-dashboard", "editable left out", _set(("editable",), _DELETE)),
]

# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", list(RULES))
def test_the_dashboard_follows_the_rule(rule: str) -> None:
    assert RULES[rule](pt.dashboard()) == []


@pytest.mark.parametrize(("rule", "how", "breaker"), BREAKERS, ids=[f"{r}: {h}" for r, h, _ in BREAKERS])
def test_the_rule_catches_a_broken_copy(rule: str, how: str, breaker: Callable[[Dashboard], None]) -> None:
    broken = copy.deepcopy(pt.dashboard())
    breaker(broken)
    assert RULES[rule](broken), f"{rule} missed: {how}"


def test_every_rule_has_a_broken_copy() -> None:
    assert {r for r, _, _ in BREAKERS} == set(RULES)


def test_the_scanner() -> None:
    expr = (
        'sum by (job, le) (rate(a_total{job=~"$job", x="}"}[$__rate_interval])) / ignoring (x) '
        'b offset 5m > bool 1e3 and {__name__="c"} * histogram_quantile(0.5, d[1h:5m])'
    )
    assert selectors(expr) == [
        ("a_total", [Matcher("job", "=~", "$job"), Matcher("x", "=", "}")]),
        ("b", []),
        ("", [Matcher("__name__", "=", "c")]),
        ("d", []),
    ]
    assert range_functions(expr) == [("rate", "$__rate_interval")]  # the subquery left out
    assert range_functions("increase(x[5m]) + max_over_time(y[1h])") == [
        ("increase", "5m"),
        ("max_over_time", "1h"),
    ]


def test_the_scanner_reads_every_dashboard_query() -> None:
    """The names it finds are those promtool_support finds, for every target."""
    for p, t in targets(pt.dashboard()):
        assert {name for name, _ in selectors(t["expr"])} == pt.metric_names(t["expr"]), where(p, t)
