"""The README's promises to a newcomer (issue 17 items 12 and 13): how long the tests take and how that was
measured, how to run the quick part, how large the installation is and how to avoid the CUDA wheels."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
README = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())


def test_test_times_are_measured_statements_with_the_quick_part() -> None:
    """It said "about 2 minutes on 2 quiet cores" for a suite that took 10 min 8 s on a fresh clone."""
    assert "about 2 minutes" not in README
    assert '`pytest -q -m "not slow"` is the quick part' in README
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(marker.startswith("slow:") for marker in markers)
    full = re.search(r"`pytest -q` runs everything.*?: (\d+) min (\d+) s on a fresh clone", README)
    assert full, "the full suite's measured time"
    assert re.search(
        r"measured on 2 cores under a load of about [\d.]+ to [\d.]+ \(\d+ tests, \d{4}-\d\d-\d\d\)", README
    )


def _installed_size(name: str, seen: set[str]) -> int:
    """Bytes of the installed files of `name` and everything it requires (no extras), each counted once."""
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return 0
    seen.add(key)
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return 0
    total = sum(file.size or 0 for file in dist.files or [])
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            total += _installed_size(requirement.name, seen)
    return total


def test_install_size_and_the_cpu_only_wheels_are_said() -> None:
    """`pip install -e .` built a 6.2 GB environment of CUDA wheels on a CPU-only machine; the README said nothing."""
    stated = re.search(
        r"`pip install -e \.` pulls PyTorch from PyPI, whose Linux wheels carry CUDA: ([\d.]+) GB", README
    )
    assert stated and "of which" in README
    assert ".venv/bin/pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in README
    if not any(d.metadata["Name"].startswith("nvidia-") for d in metadata.distributions()):
        pytest.skip("torch here has no CUDA wheels: the stated size is about the default (CUDA) install")
    measured = _installed_size("vip2clip", set())  # the package and its whole closure (its own files are tiny)
    assert float(stated.group(1)) == pytest.approx(measured / 1e9, rel=0.25), measured


def _github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_first_screen_links_resolve() -> None:
    """Issue 27: the first screen is the two commands, the CPU-only advice and where to go next; every link of the
    README to one of its sections or to a file of the repository must lead somewhere."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[3].startswith("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/vip2clip demo")
    assert lines[4].startswith(
        'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest'
    )
    first_screen = "\n".join(lines[:40])
    assert "download.pytorch.org/whl/cpu" in first_screen and "| where to go next |" in first_screen
    anchors = {_github_anchor(line.lstrip("#")) for line in lines if line.startswith("#")}
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in anchors, f"README links to #{target}, which is no heading"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
