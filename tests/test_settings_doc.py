"""The settings reference, the example file and ``serve --help`` stay true to the model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagecache import load_settings
from imagecache.cli import main
from imagecache.settings import Settings
from imagecache.settings_doc import render
from imagecache.upstreams import KINDS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("IMAGECACHE_"):
            monkeypatch.delenv(key)


def test_docs_settings_md_is_generated_from_the_current_model() -> None:
    committed = (ROOT / "docs" / "settings.md").read_text()
    assert committed == render(), (
        "docs/settings.md is out of date: run `make settings-doc` "
        "(python -m imagecache.settings_doc > docs/settings.md) and commit it"
    )


def test_the_reference_lists_every_setting_with_its_variable_and_default() -> None:
    text = render()
    for name in Settings.model_fields:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"`IMAGECACHE_{name.upper()}`" in row
    size = next(line for line in text.splitlines() if "`image_cache_max_size`" in line)
    assert "| size, ≥ 0 | `10GiB` | bytes |" in size
    stall = next(line for line in text.splitlines() if "`image_cache_stall_time`" in line)
    assert "`1d` | seconds" in stall


def test_a_setting_without_a_description_cannot_be_documented() -> None:
    from pydantic.fields import FieldInfo

    from imagecache.settings_doc import _row

    with pytest.raises(ValueError, match="'undocumented' has no description"):
        _row("undocumented", FieldInfo(annotation=int, default=1), "IMAGECACHE_")


def test_the_example_config_loads_as_it_is() -> None:
    settings = load_settings(ROOT / "etc" / "imagecache.toml")
    assert settings.image_cache_dir == Path("/var/cache/imagecache")
    assert settings.upstream == "directory:/srv/images"
    # Its units spell the defaults: the example changes nothing by accident.
    defaults = load_settings(None)
    for key in ("image_cache_max_size", "free_space_watermark", "scrub_interval", "bind_port"):
        assert getattr(settings, key) == getattr(defaults, key), key


def test_serve_help_lists_every_upstream_kind_with_an_example() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    lines = [line.strip() for line in result.output.splitlines()]
    for kind in KINDS:
        example = next((line for line in lines if line.startswith(f"{kind}:")), None)
        assert example is not None, f"serve --help shows no {kind}: example"
        # The example is a valid upstream setting.
        assert load_settings(None, upstream=example).upstream == example
    assert "docs/settings.md" in result.output
