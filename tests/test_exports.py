"""The public API is declared once, in ``imagecache.__all__``; keep it honest."""

from __future__ import annotations

import imagecache


def test_all_is_sorted_and_unique() -> None:
    assert imagecache.__all__ == sorted(imagecache.__all__)
    assert len(imagecache.__all__) == len(set(imagecache.__all__))


def test_every_exported_name_is_importable_and_defined_here() -> None:
    for name in imagecache.__all__:
        member = getattr(imagecache, name)
        if name.startswith("__"):
            continue
        # Public names must say they belong to the package, not to a private helper.
        assert getattr(member, "__module__", "imagecache").startswith("imagecache"), name


def test_every_public_name_of_the_package_is_exported() -> None:
    public = {
        name
        for name, value in vars(imagecache).items()
        if not name.startswith("_") and not isinstance(value, type(imagecache))
    }
    assert public <= set(imagecache.__all__)


def test_dir_lists_every_export_before_it_is_loaded() -> None:
    # The engine's names are loaded on first use (PEP 562); dir() and tab
    # completion must show them all the same.
    assert set(imagecache.__all__) <= set(dir(imagecache))


def test_a_lazy_export_is_the_object_of_its_home_module() -> None:
    from imagecache.cache import ImageCache
    from imagecache.drivers import create_driver
    from imagecache.settings import Settings

    assert imagecache.ImageCache is ImageCache
    assert imagecache.Settings is Settings
    assert imagecache.create_driver is create_driver


def test_an_unknown_name_is_an_attribute_error() -> None:
    assert not hasattr(imagecache, "NoSuchThing")
