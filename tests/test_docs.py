"""README.md stays a front door, and every relative link in it and in docs/ resolves.

A link to a file must name a file of the repository; a `#anchor` must be the GitHub slug of a
heading of the file it points into (README.md and docs/*.md), so moving a section cannot leave
a dead link behind.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text):
    """`text` without its fenced code blocks (their `#` lines are comments, not headings)."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every anchor of `path`'s headings, with GitHub's -1, -2 suffixes for repeats."""
    seen, result = {}, set()
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            result.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return result


def test_slug_follows_githubs_rule():
    assert slug("Accuracy on real data: does meta-learning pay, and does exact second order?") \
        == "accuracy-on-real-data-does-meta-learning-pay-and-does-exact-second-order"
    assert slug("The CLINC150 study (issue 18, 2026-11-30)") == "the-clinc150-study-issue-18-2026-11-30"
    assert slug("The fastest exact schedule that fits: `keep_graphs: auto`") \
        == "the-fastest-exact-schedule-that-fits-keep_graphs-auto"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.name}")
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; move detail into docs/"
    readme = "\n".join(lines)
    for page in PAGES[1:]:  # every docs page is reachable from the README
        assert f"docs/{page.name}" in readme, page.name
