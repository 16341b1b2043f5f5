"""The docs stay true and reachable: the README within its size, every relative link (and anchor)
of the README and docs/*.md resolving, every docs page linked from the README, the configuration
page's table equal to config.DEFAULTS (keys and defaults), no config key named in the docs that the
code does not have, and no file speaking of places outside the repository."""

import glob
import os
import re

import pytest
import yaml

from conftest import ROOT

README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
CONFIG_PAGE = os.path.join(DOCS, "configuration.md")
README_LIMIT = 12 * 1024  # bytes: the official StarGAN v2 README is 10.6 KB
# written split so that this file does not contain them itself
FORBIDDEN = ("../" "shared", "device" " tool", "SPEC" ".md")
FILE_EXTENSIONS = {"py", "md", "yaml", "json", "jsonl", "png", "pt", "txt"}  # model.py, data.md: not keys

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
TABLE = re.compile(r"<!-- config table -->\n(.*?)<!-- /config table -->", re.S)
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \|", re.M)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def markdown_files():
    return [README] + sorted(glob.glob(os.path.join(DOCS, "*.md")))


def rel(path):
    return os.path.relpath(path, ROOT)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text):
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M)
    return {slug(h) for h in headings}


def links(text):
    """Relative link targets outside fenced code: no scheme, no mail."""
    found = LINK.findall(FENCE.sub("", text))
    return [t for t in found if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(path, text):
    problems = []
    for target in links(text):
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(resolved):
            problems.append(f"{rel(path)}: {target} -> {rel(resolved)} does not exist")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(read(resolved)):
            problems.append(f"{rel(path)}: {target}: no heading #{anchor} in {rel(resolved)}")
    return problems


# ---------------------------------------------------------------------- README and links

def test_readme_is_at_most_12_kb():
    size = os.path.getsize(README)
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail to docs/"


def test_every_docs_page_is_linked_from_the_readme_and_exists():
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for t in links(read(README))
              if t.startswith("docs/") and t.partition("#")[0].endswith(".md")}
    pages = set(glob.glob(os.path.join(DOCS, "*.md")))
    assert pages, "no docs/*.md pages"
    missing = sorted(rel(p) for p in linked - pages)
    unlinked = sorted(rel(p) for p in pages - linked)
    assert not missing, f"README links to docs pages that do not exist: {missing}"
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


@pytest.mark.parametrize("path", markdown_files(), ids=rel)
def test_relative_links_resolve(path):
    assert broken_links(path, read(path)) == []


def test_a_broken_link_and_a_missing_anchor_are_caught():
    text = "[a](docs/no-such-page.md) [b](docs/configuration.md#no-such-heading) [c](https://x.org/y)\n"
    problems = broken_links(README, text)
    assert len(problems) == 2 and "does not exist" in problems[0] and "no heading" in problems[1]


def test_slugs_follow_github():
    assert slug("Packed latents: a million latents that start in seconds") == \
        "packed-latents-a-million-latents-that-start-in-seconds"
    assert slug("A held-out split (split.py)") == "a-held-out-split-splitpy"
    assert slug("The demo's video") == "the-demos-video"


# ---------------------------------------------------------------------- nothing outside the repository

def scanned_files():
    paths = [README] + glob.glob(os.path.join(DOCS, "*.md")) + glob.glob(os.path.join(ROOT, "scripts", "*"))
    paths += glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))
    return sorted(p for p in paths if os.path.isfile(p))


def test_no_file_speaks_of_places_outside_the_repository():
    found = [f"{rel(p)}: {s!r}" for p in scanned_files() for s in FORBIDDEN if s in read(p)]
    assert found == []


# ---------------------------------------------------------------------- the configuration page

def config_defaults():
    import config  # imports torch: only the tests that need it pay for it

    return dict(config.flatten(config.DEFAULTS)), [k for k, v in config.DEFAULTS.items() if isinstance(v, dict)]


def page_table(text):
    """{key: default text} of the page's config table; a key listed twice is an error."""
    block = TABLE.search(text)
    assert block, "docs/configuration.md has no <!-- config table --> ... <!-- /config table --> block"
    rows = ROW.findall(block.group(1))
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys)), f"keys listed twice: {sorted({k for k in keys if keys.count(k) > 1})}"
    return dict(rows)


def table_problems(text, defaults):
    """What differs between the page's table and config.DEFAULTS, one line each."""
    table = page_table(text)
    problems = [f"{k}: missing from the page" for k in defaults if k not in table]
    problems += [f"{k}: on the page but not a key of config.DEFAULTS" for k in table if k not in defaults]
    for key in table.keys() & defaults.keys():
        written, expected = yaml.safe_load(table[key]), defaults[key]
        if isinstance(expected, float):  # as the config reads it: YAML 1.1 takes `1e-4` for a string
            try:
                same = not isinstance(written, bool) and float(written) == expected
            except (TypeError, ValueError):
                same = False
        else:
            same = type(written) is type(expected) and written == expected
        if not same:
            problems.append(f"{key}: the page says {table[key]!r}, config.DEFAULTS has {expected!r}")
    return problems


def test_the_configuration_page_lists_every_key_with_its_default():
    defaults, _ = config_defaults()
    assert table_problems(read(CONFIG_PAGE), defaults) == []


def test_a_drifted_missing_or_unknown_key_is_caught():
    """The check above on a copy of the page with one default changed, one key dropped and one
    key invented: each is named."""
    defaults, _ = config_defaults()
    text = read(CONFIG_PAGE)
    drifted = text.replace("| `loss.r1_interval` | `16` |", "| `loss.r1_interval` | `8` |")
    dropped = re.sub(r"^\| `training.keep_checkpoints` .*\n", "", drifted, flags=re.M)
    invented = dropped.replace("<!-- /config table -->", "| `training.no_such_key` | `1` | x |\n<!-- /config table -->")
    assert drifted != text and dropped != drifted and invented != dropped
    before = table_problems(text, defaults)  # the real page's own drift is the other test's business
    problems = [p for p in table_problems(invented, defaults) if p not in before]
    assert problems == ["training.keep_checkpoints: missing from the page",
                        "training.no_such_key: on the page but not a key of config.DEFAULTS",
                        "loss.r1_interval: the page says '8', config.DEFAULTS has 16"]


def unknown_keys(text, defaults, sections):
    """`section.key` names in prose that config.DEFAULTS does not have (file names and calls aside)."""
    pattern = re.compile(rf"\b({'|'.join(sections)})\.([A-Za-z_]\w*)\b(?!\()")
    return sorted({f"{s}.{k}" for s, k in pattern.findall(text)
                   if k not in FILE_EXTENSIONS and f"{s}.{k}" not in defaults})


def test_the_docs_name_only_config_keys_that_exist():
    defaults, sections = config_defaults()
    found = {rel(p): unknown_keys(read(p), defaults, sections) for p in markdown_files()}
    assert {p: keys for p, keys in found.items() if keys} == {}
    assert unknown_keys("set `training.batch_sise=16`", defaults, sections) == ["training.batch_sise"]
