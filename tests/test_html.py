"""The HTML report: the flow graph the trace carries, the page's sections, escaping, and life without graphviz."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import gradaudit
from gradaudit.report import dot
from gradaudit.report.html import GalleryEntry, read_embedded_report, render_index, write_html
from gradaudit.rules import run_rules
from gradaudit.trace import TRACE_VERSION, Location, Trace
from tests.conftest import fixture_line

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz (dot) is not installed")


def run_with_html(gradaudit_cli, tmp_path, script: str, *args: str) -> tuple[object, str]:
    page = tmp_path / "report.html"
    result = gradaudit_cli("run", script, "--html", str(page), "--save-trace", str(tmp_path / "trace.json"), *args)
    return result, page.read_text()


def flow_section(page: str) -> str:
    return page[page.index('<section id="graph">') : page.index('<section id="raw">')]


def edge(trace: Trace, source: str, target: str):
    edges = [e for g in trace.flow_graphs for e in g.edges]
    return next(
        e
        for e in edges
        if e.source.startswith("term:") and e.source.endswith(f":{source}") and e.target == f"group:{target}"
    )


def test_flow_graph_says_which_route_is_wiped_and_which_applied(gradaudit_cli, tmp_path):
    gradaudit_cli(
        "run", "encoder_layout.py", "--save-trace", str(tmp_path / "t.json"), "--", "--layout", "encoder-in-actor"
    )
    trace = Trace.load(tmp_path / "t.json")
    wiped = edge(trace, "critic_loss", "obs_encoder")
    wipe_line = fixture_line("encoder_layout.py", "GA203-here")
    assert (wiped.fate, wiped.by) == ("wiped", f"actorvae_optimizer.zero_grad() at encoder_layout.py:{wipe_line}")
    assert wiped.norm > 0
    applied = edge(trace, "critic_loss", "critic")
    assert (applied.fate, applied.by) == ("applied", "critic_optimizer.step()")
    assert edge(trace, "vae_loss", "obs_encoder").fate == "applied"
    critic_graph = next(g for g in trace.flow_graphs if g.backward and g.backward.line == wipe_line - 5)
    members = {(e.source, e.target) for e in critic_graph.edges if e.kind == "member"}
    assert ("group:obs_encoder", "optimizer:1:actorvae_optimizer") in members
    assert ("group:critic", "group:obs_encoder") in {
        (e.source, e.target) for e in critic_graph.edges if e.kind == "input"
    }


def test_fixed_layout_has_no_wiped_route(gradaudit_cli, tmp_path):
    gradaudit_cli("run", "encoder_layout.py", "--save-trace", str(tmp_path / "t.json"), "--", "--layout", "fixed")
    trace = Trace.load(tmp_path / "t.json")
    assert all(e.fate != "wiped" for g in trace.flow_graphs for e in g.edges)
    assert edge(trace, "critic_loss", "obs_encoder").fate == "applied"


def test_unreached_groups_get_their_own_graph(gradaudit_cli, tmp_path):
    gradaudit_cli("run", "unused_head.py", "--save-trace", str(tmp_path / "t.json"), "--", "--bug")
    trace = Trace.load(tmp_path / "t.json")
    (unreached,) = [g for g in trace.flow_graphs if g.backward is None]
    finding = next(f for f in run_rules(trace) if f.rule == "GA202")
    assert f"group:{finding.subject}" in {n.id for n in unreached.nodes}


@needs_dot
def test_page_has_findings_source_graph_and_tables(gradaudit_cli, tmp_path):
    result, page = run_with_html(gradaudit_cli, tmp_path, "encoder_layout.py", "--", "--layout", "encoder-in-actor")
    assert result.exit_code == 1
    assert read_embedded_report(page)["findings"] == result.report["findings"]
    assert "gradaudit: encoder_layout.py --layout encoder-in-actor" in page
    assert f"torch {torch.__version__}" in page and f"trace version {TRACE_VERSION}" in page
    assert '<span class="badge warning">1 warning</span>' in page
    wipe_line = fixture_line("encoder_layout.py", "GA203-here")
    assert f'<span class="here"><i>{wipe_line}</i>    actorvae_optimizer.zero_grad()  # GA203-here</span>' in page
    link = re.search(r'<a class="to-graph" href="#([A-Za-z0-9_]+)">show in the graph</a>', page)
    assert link and f'<g id="{link.group(1)}" class="node"' in flow_section(page)
    assert "obs_encoder" in link.group(1)
    assert "wiped by actorvae_optimizer.zero_grad()" in flow_section(page)
    assert "GA203 gradient wiped" in flow_section(page)
    for section in ("raw", "optimizers", "matrix", "parameters"):
        assert f'<section id="{section}">' in page
    assert page.count("<details>") == 2 and "autograd nodes" in page
    assert '<table class="sortable" id="parameter-table">' in page and "obs_encoder.0.weight" in page


@needs_dot
def test_page_needs_nothing_from_the_network(gradaudit_cli, tmp_path):
    _, page = run_with_html(gradaudit_cli, tmp_path, "encoder_layout.py")
    assert not re.search(r"<(link|img|iframe|object|embed)\b", page)
    assert not re.search(r"\s(src|href)=\"(https?:)?//", page)
    policy = re.search(r"script-src 'sha256-([^']+)'", page).group(1)
    scripts = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    assert len(scripts) == 1
    assert base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode() == policy


@needs_dot
def test_hostile_names_are_text_in_the_page_and_the_svg(gradaudit_cli, tmp_path):
    result, page = run_with_html(gradaudit_cli, tmp_path, "hostile_names.py")
    hostile = "<img src=x onerror=alert(1)>"
    assert [f["subject"] for f in result.findings("GA201")] == [f"heads.{hostile}"]
    assert "<img" not in page
    assert "heads.&lt;img src=x onerror=alert(1)&gt;" in flow_section(page)
    assert read_embedded_report(page)["findings"][0]["subject"] == f"heads.{hostile}"


def test_dot_strings_are_literal():
    assert dot.quote('a"b\\N&lt;') == '"a\\"b\\\\N&amp;lt;"'
    assert dot._label("one\nline", "two") == '"one\\\\x0aline\\ntwo"'
    assert re.fullmatch(r"node_[A-Za-z0-9_]+", dot.svg_id("node", "group:<img src=x>"))
    assert dot.svg_id("node", "group:a.b") != dot.svg_id("node", "group:a_b")


def test_without_graphviz_every_finding_and_table_is_there(gradaudit_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(dot.shutil, "which", lambda name: None)
    result, page = run_with_html(gradaudit_cli, tmp_path, "encoder_layout.py", "--", "--layout", "encoder-in-actor")
    assert read_embedded_report(page)["findings"] == result.report["findings"]
    assert "apt-get install graphviz" in flow_section(page)
    assert 'id="flow-graph"' not in page
    assert 'class="finding warning"' in page and '<section id="parameters">' in page


def test_dot_that_hangs_becomes_a_note(gradaudit_cli, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setattr(dot.shutil, "which", lambda name: str(fake))
    trace_path = tmp_path / "trace.json"
    gradaudit_cli("run", "encoder_layout.py", "--save-trace", str(trace_path))
    trace = Trace.load(trace_path)
    write_html(trace, run_rules(trace), tmp_path / "r.html", dot_timeout=0.5)
    assert "took more than 0.5 s to lay out this graph" in flow_section((tmp_path / "r.html").read_text())


@needs_dot
def test_saved_trace_gives_the_same_page(gradaudit_cli, tmp_path):
    live, page = run_with_html(gradaudit_cli, tmp_path, "encoder_layout.py", "--", "--layout", "encoder-in-actor")
    offline = gradaudit_cli("report", str(tmp_path / "trace.json"), "--html", str(tmp_path / "offline.html"))
    assert offline.exit_code == live.exit_code == 1
    assert (tmp_path / "offline.html").read_text() == page


def test_version_2_trace_loads_and_says_it_has_no_graph(gradaudit_cli, tmp_path):
    gradaudit_cli("run", "encoder_layout.py", "--save-trace", str(tmp_path / "t.json"))
    raw = json.loads((tmp_path / "t.json").read_text())
    for added in ("arguments", "torch_version", "flow_graphs", "raw_graphs"):
        del raw[added]
    raw["version"] = 2
    (tmp_path / "v2.json").write_text(json.dumps(raw))
    result = gradaudit_cli("report", str(tmp_path / "v2.json"), "--html", str(tmp_path / "v2.html"))
    assert result.exit_code == 0
    page = (tmp_path / "v2.html").read_text()
    assert "trace version 2" in page and "holds no gradient-flow graph" in page
    assert "Not recorded in this trace" in page


@pytest.mark.parametrize("version", [1, 7, "3"])
def test_other_trace_versions_are_exit_2(gradaudit_cli, tmp_path, version):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"version": version, "program": "x"}))
    result = gradaudit_cli("report", str(path), "--html", str(tmp_path / "r.html"))
    assert result.exit_code == 2
    assert f"is a gradaudit trace of version {version!r}; this gradaudit reads versions 2 and 3" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r.html").exists()


def test_html_into_a_missing_folder_is_exit_2(gradaudit_cli, tmp_path):
    gradaudit_cli("run", "encoder_layout.py", "--save-trace", str(tmp_path / "t.json"))
    result = gradaudit_cli("report", str(tmp_path / "t.json"), "--html", str(tmp_path / "no" / "r.html"))
    assert result.exit_code == 2 and "--html" in result.output and "does not exist" in result.output


def test_html_into_a_missing_folder_fails_before_the_program_runs(gradaudit_cli, tmp_path):
    result = gradaudit_cli("run", "encoder_layout.py", "--html", str(tmp_path / "no" / "r.html"))
    assert result.exit_code == 2 and "does not exist" in result.output and "iteration(s) audited" not in result.output


def _train_small_model(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        optimizer.step()


def _small_model_audit(**options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with gradaudit.audit(**options) as audit:
        _train_small_model(model)
    return audit


def test_recording_the_raw_graph_changes_nothing():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    audited = copy.deepcopy(plain)
    torch.manual_seed(1)
    _train_small_model(plain)
    torch.manual_seed(1)
    with gradaudit.audit(raw_graph=True) as audit:
        _train_small_model(audited)
    assert len(audit.trace.raw_graphs) == 1 and audit.trace.raw_graphs[0].nodes
    for a, b in zip(plain.parameters(), audited.parameters(), strict=True):
        assert torch.equal(a, b)


def test_raw_graph_names_parameters_and_is_capped():
    (graph,) = _small_model_audit(raw_graph=True).trace.raw_graphs
    assert graph.node_count == len(graph.nodes) > 5
    assert {n.param for n in graph.nodes if n.param} == {
        "model.0.weight",
        "model.0.bias",
        "model.2.weight",
        "model.2.bias",
    }
    assert graph.nodes[0].op == "MeanBackward0"
    assert all(0 <= a < len(graph.nodes) and 0 <= b < len(graph.nodes) for a, b in graph.edges)
    (capped,) = _small_model_audit(raw_graph=True, raw_graph_cap=5).trace.raw_graphs
    assert capped.node_count == graph.node_count and capped.nodes == [] and capped.edges == []
    assert _small_model_audit().trace.raw_graphs == []


@needs_dot
def test_capped_raw_graph_is_a_note(tmp_path):
    audit = _small_model_audit(raw_graph=True, raw_graph_cap=5)
    write_html(audit.trace, audit.findings, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "nodes: over the cap this trace was recorded with" in page
    assert ">model</text>" in flow_section(page)


def test_missing_source_file_is_said(gradaudit_cli, tmp_path):
    gradaudit_cli(
        "run", "encoder_layout.py", "--save-trace", str(tmp_path / "t.json"), "--", "--layout", "encoder-orphan"
    )
    trace = Trace.load(tmp_path / "t.json")
    findings = run_rules(trace)
    moved = [f.__class__(**{**f.__dict__, "location": Location("gone/train.py", 3)}) for f in findings]
    write_html(trace, moved, tmp_path / "r.html")
    assert "The source file gone/train.py was not found when this report was made." in (tmp_path / "r.html").read_text()


def test_gallery_index_links_every_variant(tmp_path):
    entries = [
        GalleryEntry("lapo", "fixed", (), [], "lapo-fixed.html", True),
        GalleryEntry("lapo", "<b>", ("GA203",), [{"rule": "GA203", "severity": "warning"}] * 2, "lapo-x.html", True),
        GalleryEntry("calf", "broken", ("GA101",), [], "", False, "exit 3"),
    ]
    with open(tmp_path / "index.html", "w") as stream:
        render_index(entries, stream)
    page = (tmp_path / "index.html").read_text()
    assert '<a href="lapo-fixed.html">report</a>' in page and '<a href="lapo-x.html">report</a>' in page
    assert '<span class="badge warning">GA203</span> ×2' in page and "&lt;b&gt;" in page
    assert "could not audit: exit 3" in page


def test_report_html_of_a_fixture_with_chains(gradaudit_cli, tmp_path):
    _, page = run_with_html(gradaudit_cli, tmp_path, "flow_sampler.py")
    chains = page[page.index('<section id="chains">') :]
    assert '<svg width="180" height="44" role="img" aria-label="gradient norm per call">' in chains
    assert Path(tmp_path / "report.html").stat().st_size < 5_000_000
