"""bench/edge_report.py, the pure half of bench/edge.py: parsing and the bound's arithmetic.

No load here (speed is measured in bench/, never in tests): the module is
loaded by its path, since bench/ is not a package and its ``peers`` module
would clash with tests/peers.
"""

from __future__ import annotations

import configparser
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

PATH = Path(__file__).resolve().parents[1] / "bench" / "edge_report.py"
SHA = "ab" * 32


def _load(path: Path = PATH) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{path.stem}_under_test", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


er = _load()
timeline = _load(PATH.with_name("edge_timeline.py"))


def test_the_bound_is_the_image_over_the_link_rate() -> None:
    assert er.link_rate(200) == 25_000_000
    assert er.physical_bound(2 << 30, 200) == pytest.approx(85.899, abs=1e-3)
    assert er.physical_bound(256 << 20, 200) == pytest.approx(10.737, abs=1e-3)


def test_a_client_report_is_parsed_from_the_pipeline_output() -> None:
    got = er.parse_client(f"{SHA} *stdin\n", "\nEDGE 0 200 1024 0.125 3.5\n", 4.0)
    assert (got.exit_code, got.status, got.size, got.ttfb, got.seconds) == (
        0,
        200,
        1024,
        0.125,
        4.0,
    )
    assert got.sha256 == SHA
    assert got.ok(1024, SHA)
    assert not got.ok(1024, "cd" * 32)
    assert not got.ok(1025, SHA)


def test_a_broken_download_keeps_curls_error_and_is_not_ok() -> None:
    stderr = "curl: (18) transfer closed with 10 bytes remaining\n\nEDGE 18 200 1014 0.1 2.0\n"
    got = er.parse_client(f"{SHA} *stdin\n", stderr, 2.0)
    assert got.exit_code == 18
    assert "transfer closed" in got.error
    assert not got.ok(1014, SHA)


def test_a_killed_client_without_a_report_is_a_failure() -> None:
    got = er.parse_client("", "", 9.0)
    assert got.exit_code == -1
    assert got.error == "no report from curl"
    assert not got.ok(0, "")


def test_origin_log_lines_are_counted_per_image() -> None:
    lines = [
        '1.2.3.4 - - [t] "HEAD /img HTTP/1.1" 200 0 "-" "x"',
        '1.2.3.4 - - [t] "GET /img.sha512 HTTP/1.1" 200 129 "-" "x"',
        '1.2.3.4 - - [t] "GET /img HTTP/1.1" 200 500 "-" "x"',  # cut short by a reset
        '1.2.3.4 - - [t] "GET /img HTTP/1.1" 206 500 "-" "x"',  # the resume
        '1.2.3.4 - - [t] "GET /img HTTP/1.1" 206 1 "-" "x"',  # an access check
        '1.2.3.4 - - [t] "GET /other HTTP/1.1" 200 1000 "-" "x"',
    ]
    got = er.origin_counts(lines, "/img", "/img")
    assert (got.full_gets, got.range_gets, got.metadata) == (1, 1, 3)
    assert got.body_bytes == 1001


def _client(seconds: float, *, ok: bool = True, ttfb: float = 0.1) -> object:
    size = 1000 if ok else 500
    return er.ClientResult(0 if ok else 18, 200, size, ttfb, seconds, SHA)


def test_a_round_is_summarised_against_the_bound() -> None:
    clients = [_client(5.0, ttfb=0.1), _client(6.0, ttfb=0.3), _client(9.0, ok=False)]
    row = er.summarise(
        scenario="storm-reset",
        subject="imagecache",
        size=1000,
        mbit=0.0016,  # 200 bytes/s: a 5 s bound
        sha256=SHA,
        clients=clients,
        link_down=1010,
        link_up=10,
        wire_down=1100,
        resets=1,
        origin=er.OriginCounts(full_gets=1, range_gets=1),
    )
    assert row["bound_s"] == 5.0
    assert row["last_client_s"] == 6.0  # the last client that got the image
    assert row["last_client_any_s"] == 9.0
    assert row["last_ratio"] == 1.2
    assert row["link_ratio"] == 1.01
    assert row["wire_ratio"] == 1.1
    assert row["clients_ok"] == 2
    assert row["ttfb_median_s"] == 0.2
    assert row["failures"] == {"curl exit 18, HTTP 200, 500 B": 1}
    verdict = er.verdicts([row], "imagecache")
    assert verdict == [
        "storm-reset: link bytes 1.010x the image (≤ 1.01x, 2/3 clients ok; on the wire 1.100x): "
        "MISSED"
    ]


def test_names_are_chosen_from_the_allowed_ones() -> None:
    allowed = ("a", "b", "c")
    assert er.parse_names("all", allowed, "subject") == ["a", "b", "c"]
    assert er.parse_names("c,a,c", allowed, "subject") == ["c", "a"]
    with pytest.raises(ValueError, match="unknown subject"):
        er.parse_names("a,zz", allowed, "subject")
    with pytest.raises(ValueError, match="unknown subject"):
        er.parse_names("", allowed, "subject")


def test_the_per_connection_verdict_judges_segmented_rows_only() -> None:
    def row(segments: int, seconds: float) -> dict[str, object]:
        summary = er.summarise(
            scenario="per-connection-limit",
            subject="imagecache",
            size=1000,
            mbit=0.0016,  # 200 bytes/s: a 5 s bound
            sha256=SHA,
            clients=[_client(seconds)],
            link_down=1000,
            link_up=10,
            wire_down=1000,
            resets=0,
            origin=er.OriginCounts(full_gets=1),
        )
        summary["segments"] = segments
        return summary

    one, four, slow = row(1, 20.0), row(4, 5.5), row(4, 10.0)
    verdict = er.verdicts([one, four, slow], "imagecache")
    assert verdict[0].startswith("per-connection-limit: one connection per fill reached")
    assert "the baseline" in verdict[0]
    assert verdict[1].startswith("per-connection-limit: 4 segments reached")
    assert verdict[1].endswith("holds")
    assert verdict[2].endswith("MISSED")


def test_a_reset_rounds_moments_come_from_the_relay_samples() -> None:
    # (s, forwarded, read, accepted, resets): bytes from 0.1 s, a cut at 1.0 s,
    # nothing until 1.6 s, then the rest until 2.6 s.
    mib = 1 << 20
    samples = [
        (0.0, 0, 0, 1, 0),
        (0.1, 8192, 8192, 1, 0),
        (0.55, 10 * mib, 10 * mib, 1, 0),
        (1.0, 20 * mib, 21 * mib, 1, 1),
        (1.3, 20 * mib, 21 * mib, 2, 1),
        (1.6, 21 * mib, 22 * mib, 2, 1),
        (2.6, 41 * mib, 42 * mib, 2, 1),
        (3.6, 41 * mib, 42 * mib, 2, 1),
    ]
    moments = timeline.summary(samples)
    assert moments["first_byte_s"] == 0.1
    assert moments["cut_s"] == 1.0
    assert moments["stalled_s"] == pytest.approx(0.6)
    assert moments["bytes_end_s"] == 2.6
    assert moments["mbit_before_cut"] == pytest.approx(20 * mib * 8 / 1e6 / 0.9, abs=0.1)
    assert moments["mbit_after_resume"] == pytest.approx(20 * mib * 8 / 1e6, abs=0.1)
    assert timeline.summary(samples[:3])["cut_s"] is None  # no reset, no cut


# ------------------------------------------------ the edge Glance subject ---

eg = _load(PATH.with_name("edge_glance.py"))
GLANCE_PYTHON = Path("/opt/peers/glance-venv/bin/python")


def test_the_edge_glance_conf_opens_the_http_store_to_the_origin_only() -> None:
    parser = configparser.ConfigParser()
    parser.read_string(eg.edge_conf("http://127.0.0.1:41234"))
    assert parser["DEFAULT"]["enabled_backends"] == "fs:file, web:http"
    # Hashing at registration would read the whole image across the link.
    assert parser["DEFAULT"]["do_secure_hash"] == "false"
    assert parser["import_filtering_opts"]["allowed_hosts"] == "[127.0.0.1]"
    assert parser["import_filtering_opts"]["allowed_ports"] == "[41234]"
    for bad in ("https://127.0.0.1:1", "http://127.0.0.1", "127.0.0.1:80"):
        with pytest.raises(ValueError):
            eg.edge_conf(bad)


@pytest.mark.skipif(not GLANCE_PYTHON.exists(), reason="the Glance peer is not installed")
def test_glance_reads_the_edge_conf_as_meant(tmp_path: Path) -> None:
    # Glance's own option types (bounded lists want brackets): a value it
    # cannot parse would fail only when the first location is added.
    conf = tmp_path / "edge.conf"
    conf.write_text(eg.edge_conf("http://127.0.0.1:41234"))
    probe = (
        "import sys\n"
        "from oslo_config import cfg\n"
        "import glance.common.config, glance.async_.flows._internal_plugins\n"
        "cfg.CONF(args=[], project='glance', default_config_files=[sys.argv[1]],"
        " default_config_dirs=[])\n"
        "c = cfg.CONF\n"
        "print(c.enabled_backends, c.do_secure_hash,"
        " c.import_filtering_opts.allowed_hosts, c.import_filtering_opts.allowed_ports)\n"
    )
    done = subprocess.run(
        [str(GLANCE_PYTHON), "-W", "ignore", "-c", probe, str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == (
        "{'fs': 'file', 'web': 'http'} False ['127.0.0.1'] [41234]"
    )


def test_a_location_carries_the_origins_sha512() -> None:
    digest = "AB" * 64
    body = eg.location_body("http://127.0.0.1:1/x", digest + "\n")
    assert body == {
        "url": "http://127.0.0.1:1/x",
        "validation_data": {"os_hash_algo": "sha512", "os_hash_value": "ab" * 64},
    }
    for bad in ("ab" * 32, "zz" * 64, ""):
        with pytest.raises(ValueError):
            eg.location_body("http://127.0.0.1:1/x", bad)


def test_the_clients_send_a_members_identity_and_the_operator_is_admin() -> None:
    args = eg.curl_headers(eg.MEMBER)
    assert args[0::2] == ["-H"] * len(eg.MEMBER)
    assert "X-Identity-Status: Confirmed" in args
    assert f"X-Project-Id: {eg.PROJECT}" in args
    assert "admin" not in eg.MEMBER["X-Roles"].split(",")
    assert "admin" in eg.ADMIN["X-Roles"].split(",")
    assert eg.ADMIN["X-Project-Id"] == eg.MEMBER["X-Project-Id"]
