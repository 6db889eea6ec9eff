"""The user documentation stays short, findable and true to the code: the README within 200 lines, every relative
link resolving, docs/configuration.md's tables equal to what docs/make_configuration.py generates from Settings and
weights.py (so a new SPO_* variable or a new pin cannot be left out), and no sentence about the machines this project
is built on."""

from __future__ import annotations

import importlib.util
import re

from server import ROOT
from spo_runtime.model import weights
from spo_runtime.settings import Settings

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WRITTEN_ELSEWHERE = {"ARCHITECTURE.md"}  # the architecture issue's map, linked from the README


def _generator():
    spec = importlib.util.spec_from_file_location("make_configuration", ROOT / "docs" / "make_configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_short_and_links_the_reference():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for section in ("## GPU quick start", "## CPU demo", "## Clients", "## What it does", "## Development"):
        assert section in text, section
    for doc in ("api", "configuration", "deploy", "training", "performance"):
        assert f"docs/{doc}.md" in text and (ROOT / "docs" / f"{doc}.md").is_file(), doc


def test_relative_links_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if target.startswith(("http://", "https://")) or target in WRITTEN_ELSEWHERE:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)}: {target}"


def test_the_configuration_tables_are_generated_from_the_code():
    gen = _generator()
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert gen.render(text) == text, "docs/configuration.md is stale: run python docs/make_configuration.py"
    table = text.split(gen.TABLES["settings"][0])[1].split(gen.TABLES["settings"][1])[0]
    documented = re.findall(r"^\| `(SPO_\w+)` \|", table, re.M)
    assert documented == [Settings.variable(f) for f in Settings.model_fields]  # every variable, once, in order
    for name, field in Settings.model_fields.items():
        assert field.description, f"{Settings.variable(name)} has no description for the table"
    pins = text.split(gen.TABLES["weights"][0])[1].split(gen.TABLES["weights"][1])[0]
    for part in weights.PARTS.values():
        assert f"`{part.repo}`" in pins and (part.revision is None or f"`{part.revision}`" in pins), part.key


def test_a_missing_variable_makes_the_check_fail():
    gen = _generator()
    text = (ROOT / "docs" / "configuration.md").read_text()
    begin = gen.TABLES["settings"][0]
    lines = text.split(begin)[1].splitlines()
    dropped = text.replace(next(line for line in lines if line.startswith("| `SPO_LORA_REVISION`")) + "\n", "")
    assert gen.render(dropped) != dropped


def test_user_docs_say_nothing_about_the_build_machines():
    pattern = re.compile(r"this (2-core )?machine|GPU loan|lent machine|measured here|no GPU was lent", re.I)
    for doc in DOCS:
        hits = [line for line in doc.read_text().splitlines() if pattern.search(line)]
        assert not hits, (doc.name, hits)
