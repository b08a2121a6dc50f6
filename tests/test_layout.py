"""README's layout section names every module and subpackage of the package, so a
newcomer's map cannot fall behind the code."""

from __future__ import annotations

import re

from tests.harness.procs import ROOT


def layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout", 1)[1]
    return section.split("```", 2)[1]


def test_every_module_and_subpackage_is_in_the_readme_layout() -> None:
    block = layout_block()
    server = ROOT / "server"
    names = [p.name for p in server.glob("*.py") if not p.name.startswith("__")]
    names += [f"{p.name}/" for p in server.iterdir()
              if p.is_dir() and (p / "__init__.py").exists()]
    missing = [n for n in sorted(names) if not re.search(rf"(?<![\w/]){re.escape(n)}", block)]
    assert missing == [], f"README's layout does not name: {missing}"
    assert "fdlimit.py" in block  # the check reads the right block


def test_every_module_has_a_line_in_the_architecture_map() -> None:
    """docs/architecture.md's "Modules, one line each" is the maintainer's map: a
    module missing from it is one the next maintainer has to find by grep."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Modules, one line each", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", table))
    server = ROOT / "server"
    modules = {p.name for p in server.glob("*.py") if not p.name.startswith("__")}
    packages = {f"{p.name}/" for p in server.iterdir() if (p / "__init__.py").exists()}
    # a package is named as itself (`log/`) or by its modules (`transports/ws.py`)
    missing = sorted(n for n in modules if n not in named)
    missing += sorted(n for n in packages if not any(m.startswith(n) for m in named))
    assert missing == [], f"docs/architecture.md's module table does not name: {missing}"
