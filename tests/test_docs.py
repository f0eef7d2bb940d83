"""The documentation stays true of the code: the option tables are generated from the schema, every
public name is documented, the README's test command is CI's, and no internal reference leaks out."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import fastunlearn

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _options_script():
    spec = importlib.util.spec_from_file_location("docs_options", ROOT / "docs" / "options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_md_is_generated_from_the_schema():
    script = _options_script()
    committed = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert committed == script.render(), "docs/options.md is stale: run python docs/options.py"


def test_options_md_lists_every_command_line_option():
    """Independently of the generator: every flag each command's parser accepts is in its section."""
    script = _options_script()
    sections = re.split(r"^## ", (ROOT / "docs" / "options.md").read_text(encoding="utf-8"), flags=re.M)
    for command in script.COMMANDS:
        section = next(s for s in sections if s.startswith(f"`fastunlearn {command}`"))
        flags = {f for f in script._accepted(command) if f.startswith("--")} - {"--help", "--config"}
        missing = sorted(f for f in flags if f"`{f}`" not in section)
        assert missing == [], f"{command}: {missing}"


def test_api_md_documents_every_public_name():
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    headed = set(re.findall(r"^### `(\w+)`", text, flags=re.M))
    headed |= {
        n for h in re.findall(r"^### (`\w+`(?:, `\w+`)+)", text, flags=re.M) for n in re.findall(r"\w+", h)
    }
    mentioned = set(re.findall(r"`(\w+)`", text))
    public = set(fastunlearn._LAZY)
    assert sorted(public - mentioned) == []
    assert sorted(headed - public) == [], "api.md has a section for a name that is not public"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start")[1].split("```bash\n")[1].split("```")[0]
    commands = quick_start.strip().splitlines()
    assert commands == ["fastunlearn demo", "python -m pytest -q"]
    assert commands[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_readme_stays_short():
    assert (ROOT / "README.md").stat().st_size <= 15_000


def test_docs_cite_papers_not_internal_files():
    offenders = [str(p.relative_to(ROOT)) for p in DOCS if "SPEC" in p.read_text(encoding="utf-8")]
    assert offenders == []


# Pages the evaluation and ecosystem documentation add; the test below fails once one exists, so that
# it is taken off this list and its links are checked like the others.
PENDING: set[str] = set()


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_resolve():
    """Every relative link of the README and docs points at a file of the repository, and at one of
    its headings when it names one."""
    broken = []
    for page in DOCS:
        for target, anchor in re.findall(
            r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text(encoding="utf-8")
        ):
            path = (page.parent / target).resolve() if target else page
            if "://" in target or path.relative_to(ROOT).as_posix() in PENDING:
                continue
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
                broken.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert broken == []
    assert sorted(p for p in PENDING if (ROOT / p).exists()) == [], (
        "take the pages that now exist off PENDING"
    )
