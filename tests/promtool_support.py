"""Helpers for the observability tests: scraping /metrics, PromQL checks, promtool and a real Prometheus.

Debian's ``prometheus`` package ships both binaries (.ci/run installs it). Without them
the tests that need them are skipped, except under CI ($CI set), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import support
from prometheus_client.parser import text_string_to_metric_families

ROOT = support.ROOT
DASHBOARD = ROOT / "grafana" / "greenmail.json"
RULES = ROOT / "conf" / "greenmail-rules.yml"
SCRAPE_EXAMPLE = ROOT / "conf" / "prometheus.yml"
# What Grafana's $__rate_interval becomes with a 1 s scrape interval (4 x scrape interval) plus margin.
RATE_INTERVAL = "5s"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def need(tool: str) -> str:
    """The path of ``tool``; skip the test when it is missing (fail under CI)."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (Debian package 'prometheus'; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_tool(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, input=stdin, capture_output=True, timeout=30)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


# -- /metrics ---------------------------------------------------------------------


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metrics_text(port: int) -> str:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return body.decode()


def parse(text: str) -> Samples:
    """Every sample of a text exposition, by (name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def families(text: str) -> dict[str, str]:
    """Family name -> type (counters without their _total, as the parser names them)."""
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def sample_names(text: str) -> set[str]:
    return {name for name, _ in parse(text)}


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


# -- PromQL, statically ---------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


def blank_strings(expr: str) -> str:
    """``expr`` with each string literal's content replaced by x's (same length, same offsets)."""
    return _STRING.sub(lambda m: '"' + "x" * (len(m.group()) - 2) + '"', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and labels left out)."""
    s = blank_strings(expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    s = _NUMBER.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        if m.group() in KEYWORDS or s[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def bare_counters(expr: str, counters: set[str]) -> list[str]:
    """Counter selectors not directly inside rate()/increase() over [$__rate_interval]."""
    s = blank_strings(expr)
    bad = []
    for m in _IDENT.finditer(s):
        if m.group() not in counters:
            continue
        rest = s[m.end() :]
        if rest.startswith("{"):
            rest = rest[rest.index("}") + 1 :]
        if not rest.startswith("[$__rate_interval]") or enclosing_function(s, m.start()) not in (
            "rate",
            "increase",
        ):
            bad.append(m.group())
    return bad


def enclosing_function(s: str, pos: int) -> str:
    """The name of the function whose parentheses hold ``pos`` ("" when none do)."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        if s[i] == ")":
            depth += 1
        elif s[i] == "(":
            if depth == 0:
                m = re.search(r"([A-Za-z_]\w*)\s*$", s[:i])
                return m.group(1) if m else ""
            depth -= 1
    return ""


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target, then ("variable NAME", selector) of label_values variables."""
    d = dashboard()
    out = [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", _variable_query(v))
            assert m, v
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def _variable_query(v: dict[str, Any]) -> str:
    q = v["query"]
    return q["query"] if isinstance(q, dict) else q


# What Grafana puts for a multi-value variable set to "All": the variables' allValue.
ALL = ".+"


def substitute(expr: str, job: str = ALL, instance: str = ALL) -> str:
    """Grafana's variables replaced as the dashboard would: by default "All" (the allValue
    ``.+``), or one job and one instance (they sit in =~ matchers, so they are regexes; an
    address's dots match themselves)."""
    for name, value in (("$__rate_interval", RATE_INTERVAL), ("$job", job), ("$instance", instance)):
        expr = expr.replace(name, value)
    return expr


def check_exprs_parse(exprs: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """promtool's PromQL parser over ``exprs``, as recording rules of a scratch rules file."""
    promtool = need("promtool")
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, e in enumerate(exprs):
        lines += [f"      - record: dashboard:query{i}", f"        expr: {json.dumps(e)}"]
    path = tmp / "dashboard-rules.yml"
    path.write_text("\n".join(lines) + "\n")
    return run_tool(promtool, "check", "rules", str(path))


# -- a real Prometheus ----------------------------------------------------------------


class Prometheus:
    """``prometheus`` on a free loopback port with its own storage, scraping ``target`` every second."""

    def __init__(self, directory: Path, target: str, rules: Path = RULES) -> None:
        binary = need("prometheus")
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(rules))}\n"
            "scrape_configs:\n  - job_name: greenmail\n"
            f"    static_configs:\n      - targets: [{json.dumps(target)}]\n"
        )
        self.port = support.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.process = support.Process(args, directory / "prometheus.log")
        support.wait_until(self._ready, timeout=20, what="prometheus ready")

    def _ready(self) -> bool:
        assert self.process.proc.poll() is None, self.process.text()
        try:
            return http_get(self.url + "/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = http_get(url)
        data = json.loads(body)
        assert status == 200 and data["status"] == "success", (path, params, data)
        return data["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def series(self, selector: str) -> list[dict[str, str]]:
        return self.api("series", **{"match[]": selector})

    def stop(self) -> None:
        self.process.stop()
