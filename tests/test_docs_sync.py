"""README's short copies of docs/ blocks: the same text as the doc's, and still working.

README keeps what a newcomer needs in the first hour and links docs/producers.md and
docs/nginx.md for the rest. The two blocks it keeps on purpose (the XADD example, which
tests/test_readme.py runs, and the nginx render command) are copies of the docs' own; the
README's copies had drifted from the docs before (the Python publisher's refusals, its
replicas), so a copy that differs from its doc fails here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from tests.harness.procs import ROOT

README = ROOT / "README.md"
PRODUCERS = ROOT / "docs" / "producers.md"
NGINX = ROOT / "docs" / "nginx.md"


def sh_block(text: str, mark: str, where: str) -> str:
    """The ```sh block after `<!-- MARK -->` (a README's readme-test mark may sit between)."""
    found = re.findall(rf"<!-- {mark} -->\n(?:<!-- readme-test:[^\n]*-->\n)?```sh\n(.*?)\n```",
                       text, re.DOTALL)
    assert len(found) == 1, f"{where}: {len(found)} ```sh blocks marked <!-- {mark} -->"
    return found[0]


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", text, re.DOTALL)


def test_the_readme_xadd_example_is_the_one_docs_producers_md_gives() -> None:
    readme = sh_block(README.read_text(), "readme-test: redis-cli", "README.md")
    assert readme in sh_blocks(PRODUCERS.read_text()), (
        "README's XADD example differs from docs/producers.md's: change both")


def test_the_readme_nginx_commands_are_the_steps_in_docs_nginx_md() -> None:
    readme = sh_block(README.read_text(), "nginx-site", "README.md")
    doc = sh_block(NGINX.read_text(), "nginx-site", "docs/nginx.md")
    assert readme == doc, "README's nginx commands differ from docs/nginx.md step 4: change both"


def test_the_documented_render_command_renders_its_instances() -> None:
    """The block's `python3 nginx/render.py ...` as written (to stdout, not to /etc)."""
    block = sh_block(NGINX.read_text(), "nginx-site", "docs/nginx.md")
    flat = block.replace("\\\n", " ")  # the continued lines as one
    command = re.search(r"^python3 nginx/render\.py ([^>\n]*?)\s*>", flat, re.MULTILINE)
    assert command is not None, block
    args = shlex.split(command[1])
    done = subprocess.run([sys.executable, str(ROOT / "nginx" / "render.py"), *args],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for port in (8001, 8002, 8003):
        assert f"server 127.0.0.1:{port} " in done.stdout
    assert "server_name push.example.com;" in done.stdout
    assert "/etc/letsencrypt/live/push.example.com/fullchain.pem" in done.stdout
