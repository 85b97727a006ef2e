"""The layering rules of docs/architecture.md, checked on the source (static, no imports run).

- The library (every module but the front ends: ``imagecache.server``, the
  CLI and the demo, which start the service) never imports
  ``imagecache.server`` nor aiohttp's server side (``aiohttp.web``): data flows
  one way, and the CLI or another program can use the library without the
  service. aiohttp as an HTTP client (``aiohttp.ClientSession`` in upstreams) is
  allowed.
- No import cycle among modules, counting imports inside functions (the old
  way to dodge one) but not those under ``if TYPE_CHECKING:``, which are types
  only and never run.
- No module over ``MAX_LINES`` lines unless it is listed with its reason.
- aiohttp's ``web.HTTP*`` is built or raised nowhere in src/: handlers raise
  ``imagecache.errors`` classes, mapped to statuses by app.py's ``_errors`` alone.
- One door to the driver: outside cache.py and drivers/, nothing reaches
  through the facade with ``cache.driver`` (the rule is by ``DRIVER_ALLOWED_IN``).

``PENDING_LAYERING`` names the known breaches that issue 13 (the one-fill-path
redesign) still has to remove, each with the module that causes it (none
left). The test fails when a breach appears that is not listed, and also when
a listed one has gone (so the list only shrinks).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "imagecache"
MAX_LINES = 400

# (importing module, imported module) pairs that break the one-way rule today:
# none since fills and the sibling origin report to event sinks and the cluster's
# and maintenance's app wiring moved under server/ (issue 13).
PENDING_LAYERING: set[tuple[str, str]] = set()
# Modules longer than MAX_LINES, each one concept or pending its split (issue 13).
LONG_MODULES = {
    "imagecache.cli": "one click group; each verb a short function over the library",
    "imagecache.settings": "one settings model; the fields are the documentation",
    "imagecache.client": "the REST client of the remote CLI, one method per route",
    "imagecache.keystone": "one concept: the cache's identity and token validation",
    "imagecache.metadata": "one concept: single-flighted, remembered origin answers",
    "imagecache.drivers.files": "the file side of every driver: fills, commit, drop-behind",
    "imagecache.drivers.sqlite": "one driver",
}


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if "migrations" in parts:
            continue  # alembic's scripts, loaded by alembic, not imported
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(name: str, path: Path, *, types: bool) -> set[str]:
    """Modules imported by ``path``, in functions too; ``types``: also TYPE_CHECKING ones."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                if types:
                    visit(node.body)
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    visit(inner)
                elif isinstance(inner, list):
                    for handler in inner:
                        if isinstance(handler, ast.ExceptHandler):
                            visit(handler.body)

    visit(tree.body)
    return found


FRONT_ENDS = ("imagecache.server", "imagecache.cli", "imagecache.demo")


def _module_of(imported: str, known: set[str]) -> str:
    """``imported`` cut to the module it names (``from m import Name`` gives ``m.Name``)."""
    while imported not in known and "." in imported:
        imported = imported.rpartition(".")[0]
    return imported


def test_the_library_never_imports_the_service() -> None:
    known = {name for name, _ in modules()}
    breaches = set()
    for name, path in modules():
        if any(name == end or name.startswith(end + ".") for end in FRONT_ENDS):
            continue
        for imported in imports(name, path, types=True):
            if imported.startswith("imagecache.server"):
                breaches.add((name, _module_of(imported, known)))
            elif imported == "aiohttp.web" or imported.startswith("aiohttp.web."):
                breaches.add((name, "aiohttp.web"))
    assert breaches - PENDING_LAYERING == set(), "library modules importing the service"
    assert PENDING_LAYERING - breaches == set(), "fixed: remove these from PENDING_LAYERING"


def test_no_import_cycle() -> None:
    known = dict(modules())
    graph = {
        name: {i for i in imports(name, path, types=False) if i in known and i != name}
        for name, path in known.items()
    }
    # The root package's __init__ re-exports the public API (it imports nearly
    # everything by design), and every ``imagecache.x`` import runs it first:
    # counting it would make every module a cycle and hide the real ones.
    graph.pop("imagecache")
    for name in graph:
        graph[name].discard("imagecache")
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)
    assert cycles == []


def test_modules_stay_small_or_say_why() -> None:
    long = {
        name: len(path.read_text().splitlines())
        for name, path in modules()
        if len(path.read_text().splitlines()) > MAX_LINES
    }
    assert set(long) - set(LONG_MODULES) == set(), f"over {MAX_LINES} lines: {long}"
    assert set(LONG_MODULES) - set(long) == set(), "now short: remove from LONG_MODULES"


# Where aiohttp's ``web.HTTP*`` may be made: (module, function). Nowhere today.
# The rule (docs: imagecache/errors.py): a handler raises the library's errors
# (``RequestError`` and the rest), and app.py's ``_errors`` middleware alone
# turns them into a status and Glance's body (``app.STATUS``). What counts as
# breaking it: calling or raising a ``web.HTTP*`` class anywhere in src/
# (``raise web.HTTPNotFound(...)``, ``return web.HTTPFound(...)``, a helper that
# builds one), named as ``web.HTTPx``, ``aiohttp.web.HTTPx`` or imported
# ``HTTPx``. Allowed: ``except web.HTTPException`` and a bare ``raise`` passing
# on aiohttp's own answers (no route, a body too large), and building a plain
# ``web.Response``/``StreamResponse`` with any status (302, 304, 206) to return.
HTTP_EXCEPTIONS_ALLOWED_IN = {("imagecache.server.app", "_errors")}


def _http_exception_names(tree: ast.Module) -> set[str]:
    """Names bound by ``from aiohttp.web import HTTPx`` (or ``from aiohttp import web``'s)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("aiohttp.web", "aiohttp"):
            names.update(
                alias.asname or alias.name for alias in node.names if alias.name.startswith("HTTP")
            )
    return names


def _names_http_exception(node: ast.expr, imported: set[str]) -> bool:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id in imported
    if isinstance(node, ast.Attribute) and node.attr.startswith("HTTP"):
        base = node.value
        return (isinstance(base, ast.Name) and base.id == "web") or (
            isinstance(base, ast.Attribute) and base.attr == "web"
        )
    return False


def http_exceptions_made(name: str, path: Path) -> list[str]:
    """``module:function:line`` of each ``web.HTTP*`` built or raised in ``path``."""
    tree = ast.parse(path.read_text())
    imported = _http_exception_names(tree)
    found: list[str] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        made = (isinstance(node, ast.Call) and _names_http_exception(node, imported)) or (
            isinstance(node, ast.Raise)
            and node.exc is not None
            and not isinstance(node.exc, ast.Call)
            and _names_http_exception(node.exc, imported)
        )
        if made and (name, function) not in HTTP_EXCEPTIONS_ALLOWED_IN:
            found.append(f"{name}:{function}:{getattr(node, 'lineno', '?')}")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_http_errors_are_made_only_by_the_error_middleware() -> None:
    made = [where for name, path in modules() for where in http_exceptions_made(name, path)]
    assert made == [], "raise an imagecache.errors class; app.STATUS gives its status"


def test_the_http_error_check_sees_the_forms_it_forbids(tmp_path: Path) -> None:
    """The walk above is only as good as what it recognises: each forbidden form is caught."""
    source = tmp_path / "handler.py"
    source.write_text(
        "from aiohttp import web\n"
        "from aiohttp.web import HTTPNotFound as Gone\n"
        "import aiohttp\n"
        "def a():\n    raise web.HTTPBadRequest(text='x')\n"
        "def b():\n    raise Gone\n"
        "def c():\n    return aiohttp.web.HTTPFound('/v2/')\n"
        "def d():\n    try:\n        pass\n    except web.HTTPException:\n        raise\n"
        "def e():\n    return web.Response(status=302)\n"
    )
    assert http_exceptions_made("imagecache.server.x", source) == [
        "imagecache.server.x:a:5",
        "imagecache.server.x:b:7",
        "imagecache.server.x:c:9",
    ]


# One door to the driver (docs/architecture.md): outside the facade (cache.py)
# and the drivers themselves, code asks ``ImageCache`` what it wants and never
# reaches through it with ``cache.driver``. What counts as reaching through
# (a static rule, no types run): an attribute ``.driver`` read on an expression
# that is an ImageCache by name or by annotation:
#
# - its last name ends with ``cache`` (any case): ``cache.driver``,
#   ``self.cache.driver``, ``state.cache.driver``, ``app[STATE].cache.driver``,
#   ``self._image_cache.driver``; or
# - it is a name the module annotates as ``ImageCache`` anywhere (a parameter,
#   ``x: ImageCache = ...``), whatever it is called: ``ic.driver``.
#
# Not counted: a module's own ``self.driver`` holding a ``CentralDriver`` it was
# given (server/cluster.py, server/preheat.py, upstreams/sibling.py, which got it
# once from ``ImageCache.central``): holding a driver as a collaborator is fine.
# Not seen: ``getattr(cache, "driver")`` and aliases (``c = cache; c.driver``);
# review keeps those out.
DRIVER_ALLOWED_IN = ("imagecache.cache", "imagecache.drivers")
# (module, function, expression) reaching through today: modules another change
# owns at the moment (issue 13); the facade already has what they need
# (``ImageCache.layout``), except ``record_hit``, which hits.py will bring.
PENDING_DRIVER_DOOR: set[tuple[str, str, str]] = set()


def _last_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _names_annotated_image_cache(tree: ast.Module) -> set[str]:
    def is_image_cache(annotation: ast.expr | None) -> bool:
        if annotation is None:
            return False
        text = ast.unparse(annotation).strip("'\"")
        return any(part.strip() in ("ImageCache", "cache.ImageCache") for part in text.split("|"))

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and is_image_cache(node.annotation):
            names.add(node.arg)
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and is_image_cache(node.annotation)
        ):
            names.add(node.target.id)
    return names


def driver_reached_through(name: str, path: Path) -> set[tuple[str, str, str]]:
    """(module, function, expression) of each ``<an ImageCache>.driver`` in ``path``."""
    tree = ast.parse(path.read_text())
    annotated = _names_annotated_image_cache(tree)
    found: set[tuple[str, str, str]] = set()

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Attribute) and node.attr == "driver":
            last = _last_name(node.value)
            if last is not None and (
                last.lower().endswith("cache")
                or (isinstance(node.value, ast.Name) and last in annotated)
            ):
                found.add((name, function, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_the_driver_is_reached_only_through_the_facade() -> None:
    found = {
        where
        for name, path in modules()
        if not any(name == ok or name.startswith(ok + ".") for ok in DRIVER_ALLOWED_IN)
        for where in driver_reached_through(name, path)
    }
    assert found - PENDING_DRIVER_DOOR == set(), "ask ImageCache (cache.py), not cache.driver"
    assert PENDING_DRIVER_DOOR - found == set(), "fixed: remove from PENDING_DRIVER_DOOR"


def test_the_driver_door_check_sees_the_forms_it_forbids(tmp_path: Path) -> None:
    """Each way of reaching through the facade is caught; a held driver is not."""
    source = tmp_path / "user.py"
    source.write_text(
        "from imagecache.cache import ImageCache\n"
        "def a(cache):\n    return cache.driver.layout\n"
        "def b(state):\n    return state.cache.driver\n"
        "def c(app):\n    return app['s'].image_cache.driver.record_hit\n"
        "def d(ic: ImageCache):\n    return ic.driver\n"
        "def e(ic: 'ImageCache | None'):\n    return ic.driver\n"
        "class F:\n    def g(self):\n        return self._cache.driver\n"
        "    def h(self):\n        return self.driver.sync()\n"
        "def i(other):\n    return other.driver\n"
    )
    assert driver_reached_through("imagecache.x", source) == {
        ("imagecache.x", "a", "cache.driver"),
        ("imagecache.x", "b", "state.cache.driver"),
        ("imagecache.x", "c", "app['s'].image_cache.driver"),
        ("imagecache.x", "d", "ic.driver"),
        ("imagecache.x", "e", "ic.driver"),
        ("imagecache.x", "g", "self._cache.driver"),
    }


def image_ids_made(path: Path) -> list[str]:
    """Calls of the ``ImageId`` constructor in ``path``: each one skips the gate."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and _last_name(node.func) == "ImageId"
    ]


def test_an_image_id_is_made_only_by_the_gate() -> None:
    # An ImageId is taken as checked everywhere (layout.CacheLayout.accept):
    # made anywhere but the gate, a raw str would reach the disk unchecked.
    found = {
        (name, call)
        for name, path in modules()
        if name != "imagecache.layout"
        for call in image_ids_made(path)
    }
    assert found == set(), "ask CacheLayout.validate (the gate) for an ImageId"
    assert image_ids_made(PACKAGE / "layout.py") == ["ImageId(image_id)"]


# Components a constructor takes (issue 13: "wired by mutation after
# construction"): the fill coordinator's size limit and origin answers, the
# queue worker's prefetcher. Handed over by whoever builds them, never set on
# another object afterwards, so an object is complete once built.
WIRED_AT_CONSTRUCTION = {"capacity", "metadata", "prefetcher"}


def wired_after_construction(path: Path) -> list[str]:
    """``line: target`` for each assignment of a wired component to another object."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            if (
                isinstance(target, ast.Attribute)
                and target.attr in WIRED_AT_CONSTRUCTION
                and not (isinstance(target.value, ast.Name) and target.value.id == "self")
            ):
                found.append(f"{node.lineno}: {ast.unparse(target)}")
    return found


def test_components_are_handed_to_constructors_not_set_afterwards() -> None:
    found = [f"{name}:{hit}" for name, path in modules() for hit in wired_after_construction(path)]
    assert found == []


def test_the_wiring_check_sees_the_forms_it_forbids(tmp_path: Path) -> None:
    source = tmp_path / "wired.py"
    source.write_text(
        "class A:\n"
        "    def __init__(self, m: object) -> None:\n"
        "        self.metadata = m\n"
        "def wire(state, fills, worker, c, p) -> None:\n"
        "    state.fills.capacity = c\n"
        "    fills.metadata = c\n"
        "    worker.prefetcher: object = p\n",
        encoding="utf-8",
    )
    assert wired_after_construction(source) == [
        "5: state.fills.capacity",
        "6: fills.metadata",
        "7: worker.prefetcher",
    ]
