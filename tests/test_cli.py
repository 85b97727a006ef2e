"""Every verb of ``imagecache`` in local mode, in-process with click's runner."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from imagecache import ImageCache, ImageInfo, Settings
from imagecache.cli import _stat_value, iec, main, utc

IMAGES = {"alpha": b"a" * 300_000, "beta": b"b" * 1_500_000, "gamma": b"g" * 10_000}


def _info(image_id: str) -> ImageInfo:
    data = IMAGES[image_id]
    return ImageInfo(image_id, size=len(data), checksum=hashlib.md5(data).hexdigest())


@pytest.fixture
def filled(make_settings: Callable[..., Settings], cache_dir: Path) -> Path:
    """A cache directory holding three images; beta was read twice."""
    with ImageCache(make_settings()) as cache:
        for image_id, data in IMAGES.items():
            assert cache.cache_image_iter(image_id, [data], _info(image_id))
        for _ in range(2):
            with cache.open_for_read("beta") as handle:
                handle.read()
    return cache_dir


def run(cache_dir: Path, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, ["--cache-dir", str(cache_dir), *args], input=stdin)


def test_helpers_render_iec_and_utc() -> None:
    assert iec(512) == "512 B"
    assert iec(1536) == "1.5 KiB"
    assert iec(10 * 1024**3) == "10.0 GiB"
    assert utc(0) == "-"
    assert utc(86400 * 365) == "1971-01-01T00:00:00Z"


def test_list_cached_table_and_json(filled: Path) -> None:
    result = run(filled, "list-cached")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["ID", "Size", "Hits"]
    beta = next(line for line in lines if line.startswith("beta"))
    alpha = next(line for line in lines if line.startswith("alpha"))
    assert "1.4 MiB" in beta
    assert " 2 " in beta
    assert "never" not in beta
    assert "292.97 KiB" not in alpha
    assert "293.0 KiB" in alpha
    assert "never" in alpha

    parsed = json.loads(run(filled, "--json", "list-cached").output)
    assert [entry["image_id"] for entry in parsed] == ["alpha", "beta", "gamma"]
    assert parsed[1]["hits"] == 2
    assert parsed[1]["size"] == len(IMAGES["beta"])


def test_empty_listings(make_settings: Callable[..., Settings], cache_dir: Path) -> None:
    ImageCache(make_settings()).close()  # a new, empty cache
    assert run(cache_dir, "list-cached").output.strip() == "No cached images."
    assert run(cache_dir, "list-queued").output.strip() == "No queued images."
    assert json.loads(run(cache_dir, "--json", "list-queued").output) == []


def test_queue_image_outcomes(filled: Path) -> None:
    assert run(filled, "queue-image", "delta").output.strip() == "Queued image delta."
    assert "already queued" in run(filled, "queue-image", "delta").output
    assert "already cached" in run(filled, "queue-image", "alpha").output
    parsed = json.loads(run(filled, "--json", "queue-image", "epsilon").output)
    assert parsed == {"image_id": "epsilon", "result": "queued"}
    listed = json.loads(run(filled, "--json", "list-queued").output)
    assert [entry["image_id"] for entry in listed] == ["delta", "epsilon"]
    assert all(entry["error"] is None for entry in listed)


def test_delete_cached_image_asks_first(filled: Path) -> None:
    refused = run(filled, "delete-cached-image", "alpha", stdin="n\n")
    assert refused.exit_code == 1
    assert "Aborted" in refused.output
    assert (filled / "alpha").exists()

    confirmed = run(filled, "delete-cached-image", "alpha", stdin="y\n")
    assert confirmed.exit_code == 0
    assert "Deleted cached image alpha." in confirmed.output
    assert not (filled / "alpha").exists()

    forced = run(filled, "--json", "delete-cached-image", "-f", "beta")
    assert json.loads(forced.output) == {"deleted": "beta"}


def test_delete_all_cached_images(filled: Path) -> None:
    assert run(filled, "delete-all-cached-images", stdin="\n").exit_code == 1  # default is No
    result = run(filled, "delete-all-cached-images", "--force")
    assert result.exit_code == 0
    assert "Deleted 3 cached images." in result.output
    assert json.loads(run(filled, "--json", "list-cached").output) == []


def test_queue_deletions(cache_dir: Path) -> None:
    for image_id in ("q1", "q2", "q3"):
        run(cache_dir, "queue-image", image_id)
    assert run(cache_dir, "delete-queued-image", "q1", stdin="y\n").exit_code == 0
    missing = run(cache_dir, "delete-queued-image", "-f", "q1")
    assert missing.exit_code == 1
    assert "Error: image 'q1' is not queued" in missing.output
    result = run(cache_dir, "--json", "delete-all-queued-images", "-f")
    assert json.loads(result.output) == {"num_deleted": 2}


def test_unknown_and_bad_ids_are_one_line_errors(filled: Path) -> None:
    unknown = run(filled, "delete-cached-image", "-f", "nope")
    assert unknown.exit_code == 1
    assert unknown.output.strip() == "Error: image 'nope' is not cached"

    bad = run(filled, "queue-image", "../etc/passwd")
    assert bad.exit_code == 1
    assert bad.output.count("\n") == 1
    assert bad.output.startswith("Error: invalid image id")

    for verb in ("pin", "unpin", "verify"):
        result = run(filled, verb, "nope")
        assert result.exit_code == 1, verb
        assert result.output.startswith("Error: "), verb


def test_debug_shows_the_traceback(filled: Path) -> None:
    result = run(filled, "--debug", "queue-image", "..")
    assert result.exit_code == 1
    assert result.exception is not None
    assert "invalid image id" in str(result.exception)


def test_json_and_debug_work_after_the_verb_too(filled: Path) -> None:
    before = json.loads(run(filled, "--json", "list-cached").output)
    after = run(filled, "list-cached", "--json")
    assert after.exit_code == 0, after.output
    assert json.loads(after.output) == before
    assert json.loads(run(filled, "stats", "--json").output)["cached_images"] == 3
    debug = run(filled, "queue-image", "..", "--debug")
    assert debug.exit_code == 1
    assert "invalid image id" in str(debug.exception)


@pytest.mark.parametrize(
    "argv",
    [
        ["no-such-verb"],
        ["queue-image"],
        ["--no-such-flag", "stats"],
        ["stats", "--no-such-flag"],
        ["serve", "--port", "abc"],
        ["--url", "http://x", "stats"],  # with --cache-dir below: either, not both
    ],
    ids=lambda argv: " ".join(argv),
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path, argv: list[str]) -> None:
    result = CliRunner().invoke(main, ["--cache-dir", str(tmp_path), *argv])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "--help" in result.stderr  # where to look next


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert CliRunner().invoke(main, ["list-cached"]).exit_code == 2  # no cache named
    assert CliRunner().invoke(main, ["--cache-dir", str(tmp_path), "no-such-verb"]).exit_code == 2
    assert CliRunner().invoke(main, ["--cache-dir", str(tmp_path), "queue-image"]).exit_code == 2
    both = CliRunner().invoke(main, ["--cache-dir", str(tmp_path), "--url", "http://x", "stats"])
    assert both.exit_code == 2


def test_queue_on_node_urls_refuses_a_cache_named_as_well(filled: Path, tmp_path: Path) -> None:
    """The URLs are the nodes asked: a cache named too would be ignored, so it is refused."""
    config = tmp_path / "imagecache.toml"
    config.write_text(f'image_cache_dir = "{filled}"\n')
    nodes = ["queue-image", "img", "--nodes", "http://127.0.0.1:9"]
    for given, named in (
        (["--url", "http://127.0.0.1:9"], "--url"),
        (["--config", str(config)], "--config"),
        (["--cache-dir", str(filled)], "--cache-dir"),
    ):
        result = CliRunner().invoke(main, [*given, *nodes])
        assert result.exit_code == 2, result.output
        assert f"--nodes URL,... and {named} cannot be used together" in result.output
        assert "--nodes all" in result.output
    # A service URL from the environment was not asked for here: the named nodes are.
    ambient = CliRunner(env={"IMAGECACHE_URL": "http://127.0.0.1:9"}).invoke(
        main, ["--json", *nodes[:-1], "http://127.0.0.1:1"]
    )
    assert ambient.exit_code == 1, ambient.output
    assert list(json.loads(ambient.output)["nodes"]) == ["http://127.0.0.1:1"]

    mixed = run(filled, "queue-image", "img", "--nodes", "all,http://127.0.0.1:9")
    assert mixed.exit_code == 2
    assert "either 'all' or node URLs" in mixed.output


def test_queue_on_all_nodes_needs_cluster_mode(filled: Path) -> None:
    result = run(filled, "queue-image", "img", "--nodes", "all")
    assert result.exit_code == 1
    assert result.output.startswith("Error: queue-image --nodes all needs cluster mode")
    assert result.output.count("\n") == 1


def test_a_local_cache_beats_a_service_url_from_the_environment(filled: Path) -> None:
    result = CliRunner(env={"IMAGECACHE_URL": "http://127.0.0.1:9"}).invoke(
        main, ["--cache-dir", str(filled), "--json", "stats"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["cached_images"] == 3
    remote = CliRunner(env={"IMAGECACHE_URL": "http://127.0.0.1:9"}).invoke(main, ["stats"])
    assert remote.exit_code == 1
    assert remote.output.startswith("Error: cannot reach the imagecache service")


def test_config_file_names_the_cache(filled: Path, tmp_path: Path) -> None:
    config = tmp_path / "imagecache.toml"
    config.write_text(f'image_cache_dir = "{filled}"\n')
    result = CliRunner().invoke(main, ["--config", str(config), "--json", "list-cached"])
    assert result.exit_code == 0
    assert len(json.loads(result.output)) == 3
    config.write_text("image_cache_max_size = -1\n")
    bad = CliRunner().invoke(main, ["--config", str(config), "stats"])
    assert bad.exit_code == 1
    assert "image_cache_max_size" in bad.output


def test_prune_and_clean(filled: Path, tmp_path: Path) -> None:
    config = tmp_path / "small.toml"
    config.write_text(f'image_cache_dir = "{filled}"\nimage_cache_max_size = 1000000\n')
    with ImageCache(Settings(image_cache_dir=filled)) as cache:
        cache.pin("beta")  # the largest, but pinned: the others must go instead
    pruned = CliRunner().invoke(main, ["--config", str(config), "--json", "prune"])
    assert pruned.exit_code == 0, pruned.output
    # beta (1.5 MB) alone is over the limit; pinned, so only the others can go.
    assert json.loads(pruned.output)["total_files_pruned"] == 2
    assert (filled / "beta").exists()

    (filled / "invalid" / "junk").write_bytes(b"x")
    cleaned = run(filled, "clean")
    assert cleaned.exit_code == 0
    assert "Removed 1 invalid files" in cleaned.output
    assert json.loads(run(filled, "--json", "clean").output) == {"invalid": 0, "stalled": 0}


def test_pin_and_unpin(filled: Path) -> None:
    assert run(filled, "pin", "alpha").output.strip() == "Pinned image alpha."
    listed = {e["image_id"]: e for e in json.loads(run(filled, "--json", "list-cached").output)}
    assert listed["alpha"]["pinned"]
    assert not listed["beta"]["pinned"]
    assert "yes" in next(
        line for line in run(filled, "list-cached").output.splitlines() if line.startswith("alpha")
    )
    assert run(filled, "--json", "unpin", "alpha").output.count('"pinned": false') == 1


def test_pin_and_unpin_say_when_there_was_nothing_to_do(filled: Path) -> None:
    unpinned = run(filled, "unpin", "alpha")
    assert unpinned.exit_code == 0
    assert unpinned.output.strip() == "Image alpha was not pinned."
    assert run(filled, "pin", "alpha").output.strip() == "Pinned image alpha."
    again = run(filled, "pin", "alpha")
    assert again.exit_code == 0
    assert again.output.strip() == "Image alpha was already pinned."
    assert json.loads(run(filled, "--json", "pin", "alpha").output) == {
        "image_id": "alpha",
        "pinned": True,
        "changed": False,
    }
    assert json.loads(run(filled, "--json", "unpin", "alpha").output)["changed"] is True


def test_stats_values_read_as_words_not_python_reprs() -> None:
    assert _stat_value("maintenance_runs", {"reconcile": 1, "prune": 3}) == "reconcile 1, prune 3"
    assert _stat_value("maintenance_runs", {}) == "-"
    assert _stat_value("reserved_bytes", 1536) == "1.5 KiB"
    assert _stat_value("usage_percent", None) == "-"
    assert _stat_value("driver", "sqlite") == "sqlite"


def test_stats(filled: Path) -> None:
    values = json.loads(run(filled, "--json", "stats").output)
    assert values["cached_images"] == 3
    assert values["cached_bytes"] == sum(len(d) for d in IMAGES.values())
    assert values["total_hits"] == 2
    assert values["never_read"] == 2
    human = run(filled, "stats").output
    assert "cached bytes" in human
    assert "MiB" in human


def test_verify_detects_and_quarantines(filled: Path) -> None:
    ok = run(filled, "verify")
    assert ok.exit_code == 0, ok.output
    assert "Verifying" in ok.output
    assert "3 ok" in ok.output

    with open(filled / "beta", "r+b") as handle:
        handle.seek(700_000)
        handle.write(b"X")
    bad = run(filled, "--json", "verify")
    assert bad.exit_code == 1
    report = json.loads(bad.output)
    assert report["corrupt"] == ["beta"]
    assert report["images"]["alpha"] == "ok"
    assert (filled / "invalid" / "beta").exists()
    assert not (filled / "beta").exists()
    one = run(filled, "verify", "alpha")
    assert one.exit_code == 0
    assert "Verified 1 image (" in one.output  # one image, not "1 images"


def test_prefetch_with_progress(cache_dir: Path, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    for image_id, data in IMAGES.items():
        (origin / image_id).write_bytes(data)
        (origin / f"{image_id}.md5").write_text(hashlib.md5(data).hexdigest())
    for image_id in (*IMAGES, "absent"):
        run(cache_dir, "queue-image", image_id)
    result = run(cache_dir, "--upstream", f"directory:{origin}", "prefetch")
    assert result.exit_code == 1, result.output  # "absent" failed
    assert "Prefetching" in result.output
    assert "alpha: cached" in result.output
    # Each failure once, with its reason on the same line.
    lines = result.output.splitlines()
    assert [line for line in lines if line.startswith("absent")] == [
        "absent: failed: image 'absent' not found upstream"
    ]
    queued = json.loads(run(cache_dir, "--json", "list-queued").output)
    assert [q["image_id"] for q in queued] == ["absent"]
    assert "not found" in queued[0]["error"]

    again = run(cache_dir, "--json", "--upstream", f"directory:{origin}", "prefetch")
    assert json.loads(again.output)["images"]["absent"]["outcome"] == "failed"

    no_upstream = run(cache_dir, "prefetch")
    assert no_upstream.exit_code == 1
    assert "upstream" in no_upstream.output


def test_remote_mode_reports_an_unreachable_service() -> None:
    result = CliRunner().invoke(main, ["--url", "http://127.0.0.1:9", "list-cached"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot reach the imagecache service at")
    assert result.output.count("\n") == 1


# Every verb that reads a cache or acts on what it holds; none may make a new one.
_EXISTING_CACHE_VERBS = [
    ["list-cached"],
    ["list-queued"],
    ["stats"],
    ["verify"],
    ["prune"],
    ["clean"],
    ["prefetch"],
    ["pin", "alpha"],
    ["unpin", "alpha"],
    ["delete-cached-image", "-f", "alpha"],
    ["delete-all-cached-images", "-f"],
    ["delete-queued-image", "-f", "alpha"],
    ["delete-all-queued-images", "-f"],
]


@pytest.mark.parametrize("verb", _EXISTING_CACHE_VERBS, ids=lambda verb: verb[0])
def test_a_mistyped_cache_dir_is_refused_and_nothing_is_created(
    tmp_path: Path, verb: list[str]
) -> None:
    absent = tmp_path / "typo" / "cache"
    result = run(absent, *verb)
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: cache directory {str(absent)!r} does not exist\n"
    assert not (tmp_path / "typo").exists()

    # A directory that exists but holds no cache (here: somebody's files).
    other = tmp_path / "home"
    other.mkdir(exist_ok=True)
    (other / "notes.txt").write_text("not an image cache")
    result = run(other, *verb)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {str(other)!r} is not a cache directory"), (
        result.output
    )
    assert result.output.count("\n") == 1
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_verbs_that_add_images_may_start_a_new_cache(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    assert run(fresh, "queue-image", "alpha").exit_code == 0
    # From now on it is a cache: the read-only verbs accept it.
    assert run(fresh, "list-queued").output.splitlines()[-1].startswith("alpha ")


def test_a_cache_is_recognised_by_its_database_or_its_subdirectories(tmp_path: Path) -> None:
    from imagecache.layout import is_cache_dir

    assert not is_cache_dir(tmp_path / "absent")
    assert not is_cache_dir(tmp_path)
    (tmp_path / "cache.db").write_bytes(b"")
    assert is_cache_dir(tmp_path)
    other = tmp_path / "glance"
    (other / "invalid").mkdir(parents=True)
    assert is_cache_dir(other)


def test_version_comes_from_the_package() -> None:
    from imagecache import __version__

    result = CliRunner().invoke(main, ["--version"])
    assert (result.exit_code, result.output) == (0, f"imagecache, version {__version__}\n")
