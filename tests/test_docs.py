"""The documentation is self-contained: code cites only docs/ in the repository, and they exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Folders whose files may cite documentation; tests are checked too (this file excepted).
SCANNED = ('geocmid', 'cli', 'bench', 'configs', 'scripts', 'tests')
SUFFIXES = {'.py', '.yaml', '.yml', '.sh', '.toml', '.cfg', '.txt', '.md'}

#: The method and design notes the code once cited from outside the repository.
OUTSIDE_NOTES = ('cmid', 'gersp', 'torchgeo-0.10', 'inference-and-peers', 'architecture')

#: A note cited without the repository's ``docs/`` prefix.
BARE_NOTE = re.compile(r'(?<![\w/-])(' + '|'.join(map(re.escape, OUTSIDE_NOTES)) + r')\.md\b')
#: A defect or requirement tag of the outside notes (D1, G2, R4.1) or a section sign.
TAG = re.compile(r'\b[DGR]\d+(\.\d+)?\b|§')
#: Linter suppressions (noqa comments with codes such as D102), which are not citations.
NOQA = re.compile(r'#\s*noqa\b.*$', re.IGNORECASE)
#: A citation of a page under docs/, with an optional anchor.
DOCS_CITATION = re.compile(r'docs/([\w.-]+\.md)(?:#([\w-]+))?')
#: A relative Markdown link in the documentation.
MD_LINK = re.compile(r'\]\(([^)#\s]+\.md)(?:#([\w-]+))?\)')


def scanned_files() -> list[Path]:
    """Every text file under the scanned folders, this test excepted."""
    files = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob('*')):
            if (
                path.is_file()
                and path.suffix in SUFFIXES
                and path != Path(__file__).resolve()
                and '__pycache__' not in path.parts
            ):
                files.append(path)
    return files


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown page."""
    found = set()
    for line in page.read_text().splitlines():
        if match := re.match(r'#{1,6}\s+(.*)', line):
            title = re.sub(r'[^\w\- ]', '', match.group(1).strip().lower())
            found.add(title.replace(' ', '-'))
    return found


def citations() -> list[tuple[Path, int, str, str | None]]:
    """(file, line, page, anchor) of every ``docs/X.md`` cited in the scanned files."""
    cited = []
    for path in scanned_files():
        for number, line in enumerate(path.read_text(errors='replace').splitlines(), 1):
            for match in DOCS_CITATION.finditer(line):
                cited.append((path, number, match.group(1), match.group(2)))
    return cited


def test_the_scan_sees_the_package() -> None:
    files = {path.relative_to(ROOT).as_posix() for path in scanned_files()}
    assert 'geocmid/models/losses.py' in files
    assert 'configs/cmid_resnet50.yaml' in files


def test_no_citation_of_notes_outside_the_repository() -> None:
    offences = []
    for path in scanned_files():
        for number, line in enumerate(path.read_text(errors='replace').splitlines(), 1):
            text = NOQA.sub('', line)
            if BARE_NOTE.search(text) or TAG.search(text):
                offences.append(f'{path.relative_to(ROOT)}:{number}: {line.strip()}')
    assert not offences, 'cite docs/ in the repository instead:\n' + '\n'.join(offences)


def test_cited_docs_and_sections_exist() -> None:
    cited = citations()
    assert cited, 'the code cites no page of docs/'
    missing = []
    for path, number, page, anchor in cited:
        target = ROOT / 'docs' / page
        where = f'{path.relative_to(ROOT)}:{number}'
        if not target.is_file():
            missing.append(f'{where}: docs/{page} does not exist')
        elif anchor is not None and anchor not in anchors(target):
            missing.append(f'{where}: docs/{page} has no section #{anchor}')
    assert not missing, '\n'.join(missing)


@pytest.mark.parametrize(
    'page', sorted([*(ROOT / 'docs').glob('*.md'), ROOT / 'README.md', ROOT / 'CONTRIBUTING.md'])
)
def test_links_between_pages_resolve(page: Path) -> None:
    broken = []
    for target, anchor in MD_LINK.findall(page.read_text()):
        if '://' in target:
            continue
        resolved = (page.parent / target).resolve()
        if not resolved.is_file():
            broken.append(f'{target} does not exist')
        elif anchor and anchor not in anchors(resolved):
            broken.append(f'{target} has no section #{anchor}')
    assert not broken, f'{page.name}: ' + '; '.join(broken)


@pytest.mark.parametrize('line', ['# see cmid.md 9', '# (spec D4)', '# gersp.md G1', '# § 3'])
def test_the_check_catches_outside_citations(line: str) -> None:
    text = NOQA.sub('', line)
    assert BARE_NOTE.search(text) or TAG.search(text)


@pytest.mark.parametrize(
    'line',
    ['# docs/cmid.md#deviations', 'def height(self) -> int: ...  # noqa: D102', 'x = D2x'],
)
def test_the_check_allows_repository_citations(line: str) -> None:
    text = NOQA.sub('', line)
    assert not BARE_NOTE.search(text) and not TAG.search(text)
