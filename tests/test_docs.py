"""The documentation: the site builds with every warning an error, and the pages say what the code does.

- The site (mkdocs.yml, docs/) builds with ``mkdocs build --strict``: a broken link, an unknown anchor,
  a page left out of the nav, a missing snippet or an unresolved API reference fails it.
- The command-line reference lists every option of the commands' parsers; the study spec keys page
  every key a spec may have; the HDF5 log page every attribute, group and column a real log holds.
- README.md is a front page: at most about 200 lines, its first two commands ``make demo`` and
  ``make test``, its links inside the repository.
- No prose page carries a measurement date except inside a provenance block, the admonition
  ``!!! info "Provenance"`` with its indented body (CONTRIBUTING.md, "Documentation"); every such block
  names the machine, commit, date and command, and each results page opens with exactly one.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, launch_env

DOCS = REPO / "docs"
README = REPO / "README.md"
README_MAX_LINES = 200
# Prose pages: every Markdown page of the site, and the repository's own Markdown files. CHANGELOG.md is
# dated by nature (a version's date); docs/changelog.md only includes it.
PROSE = sorted({*DOCS.rglob("*.md"), README, REPO / "BENCHMARKS.md", REPO / "CONTRIBUTING.md"})
RESULTS_PAGES = [DOCS / "mini-study" / "index.md", DOCS / "fashion-study" / "index.md",
                 DOCS / "fashion-study" / "pruning-methods" / "index.md", DOCS / "mnist-study" / "index.md"]

PROVENANCE = re.compile(r'^(?:!!!|\?\?\?\+?) info "Provenance"\s*$')
MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December|"
          "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec")
DATE = re.compile(
    r"\b(?:19|20)\d\d-(?:0[1-9]|1[0-2])(?:-\d\d)?\b"  # 2026-11-29, 2026-11
    rf"|\b(?:{MONTHS})\.?\s+(?:\d{{1,2}}(?:st|nd|rd|th)?,?\s+)?(?:19|20)\d\d\b"  # November 2026, Nov 29, 2026
    rf"|\b\d{{1,2}}\s+(?:{MONTHS})\.?,?\s+(?:19|20)\d\d\b"  # 29 November 2026
)


def _hook():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_provenance(text: str) -> tuple[list[tuple[int, str]], list[list[str]]]:
    """(the lines outside provenance blocks, numbered from 1; the blocks' bodies): a block is the
    admonition line and every indented or blank line after it."""
    outside, blocks, body = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        if body is not None and (line.startswith("    ") or not line.strip()):
            body.append(line)
            continue
        body = None
        if PROVENANCE.match(line):
            body = []
            blocks.append(body)
            continue
        outside.append((number, line))
    return outside, blocks


def dates_outside_provenance(path: Path, root: Path = REPO) -> list[str]:
    outside, _ = split_provenance(path.read_text())
    return [f"{path.relative_to(root)}:{n}: {m.group(0)!r} in {line.strip()[:100]!r}"
            for n, line in outside for m in DATE.finditer(line)]


def test_no_prose_page_carries_a_date_outside_a_provenance_block():
    found = [hit for page in PROSE for hit in dates_outside_provenance(page)]
    assert not found, "dates outside a provenance block (move them into one, or out of the prose):\n" + "\n".join(found)


def test_the_date_check_sees_dates_in_every_spelling_and_spares_provenance_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('It took 21 s on 2026-11-28.\nSeen in November 2026, on Dec 6, 2026 and 6 December 2026.\n'
                    'Lee et al. 2019; ICLR 2020; torch 2.14.1; batch 2048-4096.\n\n'
                    '!!! info "Provenance"\n    Machine: m. Commit: abc1234. Date: 2026-12-06. Command: `make x`.\n\n'
                    'After the block, 2026-12 again.\n')
    hits = [h.split(": ", 1)[1].split(" in ")[0] for h in dates_outside_provenance(page, root=tmp_path)]
    assert hits == ["'2026-11-28'", "'November 2026'", "'Dec 6, 2026'", "'6 December 2026'", "'2026-12'"]


def test_every_provenance_block_names_machine_commit_date_and_command():
    incomplete = []
    for page in PROSE:
        for body in split_provenance(page.read_text())[1]:
            text = " ".join(body)
            missing = [f for f in ("Machine", "Commit", "Date", "Command") if f + ":" not in text and f + "s:" not in text]
            if missing or not DATE.search(text):
                incomplete.append(f"{page.relative_to(REPO)}: missing {missing or 'a date'}: {text.strip()[:120]!r}")
    assert not incomplete, "\n".join(incomplete)


@pytest.mark.parametrize("page", RESULTS_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_each_results_page_opens_with_one_provenance_block(page):
    text = page.read_text()
    lines = text.splitlines()
    blocks = [i for i, line in enumerate(lines) if PROVENANCE.match(line)]
    assert len(blocks) == 1, f"{page}: {len(blocks)} provenance blocks, want exactly one"
    first_section = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    assert blocks[0] < first_section, f"{page}: the provenance block must come before the first section"


def readme_commands() -> list[str]:
    """The command lines of the README's shell code blocks, in order (comments and prompts dropped)."""
    commands, fence = [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence in ("bash", "sh", "shell", "console") and line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip().removeprefix("$ "))
    return commands


def test_the_readme_is_a_front_page_whose_first_two_commands_are_make_demo_and_make_test():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the front page keeps to {README_MAX_LINES}"
    first_two = [c.split("#")[0].split() for c in readme_commands()[:2]]
    assert first_two == [["make", "demo"], ["make", "test"]], readme_commands()[:2]


def test_the_readme_links_resolve_inside_the_repository():
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", README.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (REPO / target.split("#")[0]).resolve()
        if not path.is_relative_to(REPO) or not path.exists():
            broken.append(target)
    assert not broken, f"README.md links to what is not in the repository: {broken}"


def test_nothing_points_at_files_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    new = [str(p.relative_to(REPO)) for p in (*PROSE, REPO / "CHANGELOG.md", REPO / "mkdocs.yml")]
    found = []
    for name in sorted(set(tracked) | set(new)):
        path = REPO / name
        if path == Path(__file__) or path.suffix not in (".md", ".py", ".yaml", ".yml", ".cfg", ".sh", ".txt", "") \
                or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        found += [f"{name}: {w}" for w in ("PAPER.md", "../shared") if w in text]
    assert not found, found


# The command-line reference, the spec keys and the log schema


def test_the_cli_reference_renders_every_option_of_every_command():
    hook = _hook()
    page = (DOCS / "reference" / "cli.md").read_text()
    for command in hook.COMMANDS:
        assert f"<!-- cli: {command} -->" in page, f"reference/cli.md has no marker for {command}"
        rendered = hook.render(command)
        missing = [o for o in hook.option_strings(hook.parser_of(command)) if f"`{o}" not in rendered]
        assert not missing, f"{command}: the rendered reference misses {missing}"


def test_an_unknown_command_in_a_cli_marker_fails_the_build():
    with pytest.raises(ValueError, match="unknown command 'trian'"):
        _hook().on_page_markdown("<!-- cli: trian -->", None, None, None)


def spec_keys_on_page() -> set[str]:
    text = (DOCS / "reference" / "study-spec.md").read_text()
    return {key for row in re.findall(r"^\| ([^|]+) \|", text, re.M) for key in re.findall(r"`([a-z_]+)`", row)}


def test_the_spec_keys_page_lists_every_key_a_spec_may_have_and_no_other():
    from hvd_sparse.study import StudySpec

    keys = {f.name for f in dataclasses.fields(StudySpec)} - {"sobol_skip", "sobol_seed"} | {"sobol"}
    page = spec_keys_on_page()
    assert keys <= page, f"docs/reference/study-spec.md does not list {sorted(keys - page)}"
    assert page <= keys, f"docs/reference/study-spec.md lists keys a spec cannot have: {sorted(page - keys)}"


def schema_names() -> set[str]:
    """Every name the log page's tables give in their first column, whole (``lipschitz/step``), by its
    last part (``step``) and by its group (``lipschitz/``)."""
    text = (DOCS / "reference" / "log-schema.md").read_text()
    names = {name for row in re.findall(r"^\| ([^|]+) \|", text, re.M) for name in re.findall(r"`([^`]+)`", row)}
    parts = {n.rsplit("/", 1)[-1] for n in names if not n.endswith("/")}
    groups = {n.split("/")[0] + "/" for n in names if "/" in n}
    return names | parts | groups


def known_log_names() -> set[str]:
    """The attributes and columns the code writes, read from it: the columns, the statuses' attributes,
    what log.py sets by name, a study's attributes."""
    from hvd_sparse import log, study

    names = set(log.COLUMNS) | set(log.REQUIRED_ATTRS) | set(log.CAPPING_ATTRS)
    names |= set(re.findall(r'attrs\["(\w+)"\]', inspect.getsource(log)))
    names |= set(re.findall(r'"(\w+)":', inspect.getsource(study.Trial.attrs))) | {"adopted_from"}
    return names - {"shape"}  # the mask datasets' own attribute, listed with them


def test_the_log_page_lists_every_attribute_and_column_the_code_writes():
    missing = known_log_names() - schema_names()
    assert not missing, f"docs/reference/log-schema.md does not list {sorted(missing)}"


@pytest.mark.launches
def test_the_log_page_lists_everything_a_real_log_holds(tmp_path):
    """One short run that writes every optional part (noise scale, Lipschitz, the test split), read
    back name by name."""
    import h5py

    proc = subprocess.run(
        [sys.executable, "-m", "hvd_sparse.train", "--dataset", "synthetic", "--model", "mlp-tiny", "--sparsity", "0.5",
         "--batch-size", "32", "--max-steps", "20", "--eval-every", "10", "--goal-error", "0", "--report-test",
         "--noise-scale-every", "5", "--lipschitz-every", "10", "--no-progress", "--out", str(tmp_path)],
        env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("*.h5")
    found: set[str] = set()
    with h5py.File(path, "r") as f:
        found |= set(f.attrs)
        for group in f:
            found.add(f"{group}/")
            if group == "mask":
                continue
            found |= set(f[group]) | set(f[group].attrs)
    missing = found - schema_names()
    assert not missing, f"docs/reference/log-schema.md does not list {sorted(missing)} (in {path.name})"


@pytest.mark.launches
def test_the_site_builds_with_every_warning_an_error_and_its_cli_page_has_every_option(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                           "--site-dir", str(site)],
                          env={**launch_env(), "NO_MKDOCS_2_WARNING": "1"}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "WARNING" not in proc.stderr, proc.stderr[-5000:]
    hook = _hook()
    html = (site / "reference" / "cli" / "index.html").read_text()
    for command in hook.COMMANDS:
        missing = [o for o in hook.option_strings(hook.parser_of(command)) if o not in html]
        assert not missing, f"the built command-line reference misses {command}'s {missing}"
    assert (site / "reference" / "api" / "index.html").read_text().count('class="doc doc-object') >= 10
    assert not (site / "hooks").exists() and not (site / "requirements.txt").exists()
