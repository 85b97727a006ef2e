"""The observability kit in contrib/: alert rules and dashboard, checked against real output.

promtool (Debian's ``prometheus`` package; ``.ci/run`` installs it) checks the
rules file and lints a real scrape of a running service; every metric the rules
and the dashboard query must be one the service really exposes, so neither can
drift into alerting on a name that no longer exists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from server_helpers import image_bytes, put_image, start_serve

CONTRIB = Path(__file__).resolve().parents[1] / "contrib"
RULES = CONTRIB / "prometheus" / "imagecache-alerts.yml"
DASHBOARD = CONTRIB / "grafana" / "imagecache-dashboard.json"
_METRIC = re.compile(r"\b(imagecache_[a-z_]+)")
# Series derived from a histogram or counter family by the exposition format.
_SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("SKIPPED LOUDLY: promtool is not installed (Debian package prometheus)")
    return found


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_severity_and_a_summary() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 8
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def _lint(promtool: str, text: str) -> None:
    lint = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


async def _scrape(tmp_path: Path) -> str:
    origin = tmp_path / "origin"
    put_image(origin, "img", image_bytes(64 * 1024))
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    server = await start_serve(cache_dir, f"directory:{origin}", workers=2)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # a miss, then a hit: the counters have samples
                async with session.get(server.url + "/v2/images/img/file") as response:
                    assert response.status == 200
                    await response.read()
            async with session.get(server.url + "/metrics") as response:
                assert response.status == 200
                return await response.text()
    finally:
        assert await server.stop() == 0


async def test_a_real_scrape_passes_promtool_and_has_every_queried_metric(
    tmp_path: Path,
) -> None:
    promtool = _promtool()
    text = await _scrape(tmp_path)
    # The service has stopped by now: nothing waits on this loop while promtool runs.
    _lint(promtool, text)
    exposed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            # A labelled family with no samples yet shows only here.
            _, _, name, kind = line.split(" ", 3)
            exposed |= {name, f"{name}_total"} if kind == "counter" else {name}
        elif line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            exposed.add(name)
            for suffix in _SUFFIXES:
                if name.endswith(suffix):
                    exposed.add(name.removesuffix(suffix))
    queried = set(_METRIC.findall(RULES.read_text()))
    queried |= set(_METRIC.findall(json.dumps(json.loads(DASHBOARD.read_text()))))
    missing = sorted(queried - exposed)
    assert not missing, f"queried by contrib/ but not exposed by the service: {missing}"
