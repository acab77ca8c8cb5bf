"""oisp's built-in providers are built only from what a third-party provider can use: the plugin kit and the
public modules (a test, so that no private helper creeps back into them)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import oisp.providers

#: What a provider plugin of another package may import from oisp.
PUBLIC = {"oisp.provider_kit", "oisp.events", "oisp.framing", "oisp.hookspecs", "oisp.http", "oisp.http.exchange",
          "oisp.http.websocket", "oisp.redaction"}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "oisp" or name.startswith("oisp.")}


def test_built_in_providers_import_only_the_kit_and_public_modules() -> None:
    folder = Path(oisp.providers.__file__).parent
    modules = sorted(folder.glob("*.py"))
    assert len(modules) > 10
    for module in modules:
        private = {name for name in imported_modules(module)
                   if name not in PUBLIC and not name.startswith("oisp.providers.")}
        assert not private, f"{module.name} imports {sorted(private)}, which a third-party provider cannot rely on"


def test_the_kit_exports_what_its_guide_names() -> None:
    import oisp.provider_kit as kit

    guide = (Path(__file__).parents[2] / "docs" / "provider-plugins.md").read_text(encoding="utf-8")
    section = guide.split("## The plugin kit", 1)[1].split("\n## ", 1)[0]
    named = {name for row in section.splitlines() if row.startswith("| `")
             for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert named and named <= set(kit.__all__), sorted(named - set(kit.__all__))
    for name in kit.__all__:
        assert getattr(kit, name) is not None
