"""Drivers, upstreams and fills take their configuration as values, never the settings model.

Static, like tests/test_architecture.py: no module is imported. Outside the
three package modules that copy values out of ``Settings`` (``driver_config``
beside ``create_driver``, ``upstream_config`` beside ``create_upstream``,
``fill_config``), no module of ``imagecache.drivers``, ``imagecache.upstreams``
or ``imagecache.fill`` imports ``imagecache.settings`` (not even for a type), names ``Settings``, or
reads a ``.settings`` attribute (Glance's drivers read a global ``CONF``
anywhere; here ``create_app`` and the CLI build ``DriverConfig``,
``UpstreamConfig`` and ``FillConfig`` once and hand them down). And nothing reads the settings
back through the cache facade (``cache.settings``): ``ImageCache`` keeps
only the values it uses.
"""

from __future__ import annotations

import ast
from pathlib import Path

from test_architecture import imports, modules

FAMILIES = ("imagecache.drivers", "imagecache.upstreams", "imagecache.fill")
# The packages' own modules: each builds its family's config from Settings, in one function.
WIRING = set(FAMILIES)


def settings_uses(name: str, path: Path) -> set[str]:
    """How ``path`` reaches the settings model: imports, the ``Settings`` name, ``.settings``."""
    found = {
        f"imports {imported}"
        for imported in imports(name, path, types=True)
        if imported == "imagecache.settings" or imported.startswith("imagecache.settings.")
    }
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id == "Settings":
            found.add("names Settings")
        elif isinstance(node, ast.Attribute) and node.attr in ("Settings", "settings"):
            found.add(f"reads {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            # A quoted annotation: "Settings" or "Settings | None".
            and any(part.strip() == "Settings" for part in node.value.split("|"))
        ):
            found.add("names Settings")
    return found


def test_drivers_upstreams_and_fills_never_see_the_settings() -> None:
    found = {
        (name, use)
        for name, path in modules()
        if any(name.startswith(family + ".") for family in FAMILIES) and name not in WIRING
        for use in settings_uses(name, path)
    }
    assert found == set(), "pass a DriverConfig, UpstreamConfig or FillConfig, not the settings"


def test_the_settings_check_sees_the_forms_it_forbids(tmp_path: Path) -> None:
    source = tmp_path / "driver.py"
    source.write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from imagecache import settings as s\n"
        "def a(x: Settings) -> None: ...\n"
        "def b(x: 'Settings | None') -> None: ...\n"
        "class C:\n    def d(self) -> float:\n        return self.settings.upstream_timeout\n"
        "def e(config: object) -> object:\n    return config\n"
    )
    assert settings_uses("imagecache.drivers.x", source) == {
        "imports imagecache.settings",
        "names Settings",
        "reads self.settings",
    }


def settings_read_through_a_cache(path: Path) -> set[str]:
    """Each ``<...cache>.settings`` in ``path`` (``cache``, ``self.cache``, ``state.cache``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "settings":
            inner = node.value
            last = inner.attr if isinstance(inner, ast.Attribute) else getattr(inner, "id", "")
            if last.lower().endswith("cache"):
                found.add(ast.unparse(node))
    return found


def test_nothing_reads_the_settings_through_the_cache() -> None:
    found = {(name, use) for name, path in modules() for use in settings_read_through_a_cache(path)}
    assert found == set(), "hand the component its values where it is built"


def test_the_cache_check_sees_the_forms_it_forbids(tmp_path: Path) -> None:
    source = tmp_path / "job.py"
    source.write_text(
        "def a(cache):\n    return cache.settings.idle_ttl\n"
        "def b(self):\n    return self.cache.settings\n"
        "def c(state):\n    return state.image_cache.settings\n"
        "def d(app):\n    return app.settings.public_url\n"
    )
    assert settings_read_through_a_cache(source) == {
        "cache.settings",
        "self.cache.settings",
        "state.image_cache.settings",
    }
