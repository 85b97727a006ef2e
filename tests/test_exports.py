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
