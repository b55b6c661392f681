"""docs/configuration.md's generated reference is current; LICENSE and CITATION.cff agree with
pyproject.toml."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import yaml

from umerl.config.schema import SCHEMA

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("config_reference",
                                                  ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_is_up_to_date() -> None:
    script = _script()
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert script.render(page) == page, "run: python scripts/config_reference.py"


def test_the_reference_lists_every_key_with_its_default_and_rule() -> None:
    script = _script()
    text = script.reference()
    for key in SCHEMA:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        assert SCHEMA[key].allowed.replace("|", "\\|") in row, key
    assert "| `rl.group_size` | `8` | an integer >= 2 |" in text
    assert "| `sft.lr` | `0.001` | a number > 0.0 |" in text


def test_license_and_citation() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in license_text
    for section in ("1. Definitions.", "2. Grant of Copyright License.",
                    "3. Grant of Patent License.", "9. Accepting Warranty or Additional "
                    "Liability.", "END OF TERMS AND CONDITIONS"):
        assert section in license_text, section
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["version"] == project["version"] and cff["license"] == "Apache-2.0"
    paper = cff["preferred-citation"]
    assert paper["title"].startswith("UME-R1:") and paper["year"] == 2026
    assert "arXiv:2511.00405" in [i["value"] for i in paper["identifiers"]]


def test_the_bibtex_block_agrees_with_citation_cff() -> None:
    """docs/method.md's BibTeX (linked from the README) names the paper CITATION.cff names:
    its title, every author in order, the year and the arXiv id."""
    import re

    page = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    block = re.search(r"```bibtex\n(.*?)```", page, re.S)
    assert block, "docs/method.md has no ```bibtex block"
    fields = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?\s*$", block.group(1), re.M))
    paper = yaml.safe_load((ROOT / "CITATION.cff").read_text())["preferred-citation"]
    assert fields["title"].replace("{", "").replace("}", "") == paper["title"]
    assert fields["author"] == " and ".join(f"{a['family-names']}, {a['given-names']}"
                                            for a in paper["authors"])
    assert int(fields["year"]) == paper["year"]
    assert f"arXiv:{fields['eprint']}" in [i["value"] for i in paper["identifiers"]]
    assert "docs/method.md#citation" in (ROOT / "README.md").read_text(encoding="utf-8")
