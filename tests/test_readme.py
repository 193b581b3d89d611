"""The README says what the code does: its table of config groups lists exactly the options conf/ holds."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("dataset", "model", "partition", "strategy", "attack", "scenario", "defense")


def readme_options() -> dict[str, set[str]]:
    """{group: the options its row names}: the backticked plain names of the row (not `key=value`, not
    `group.key`, not commands)."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"^\| `(\w+)` \| (.*) \|$", line)
        if m and m.group(1) in GROUPS:
            rows[m.group(1)] = set(re.findall(r"`([a-z0-9_]+)`", m.group(2)))
    return rows


def conf_options(group: str) -> set[str]:
    return {p.stem for p in (REPO / "conf" / group).glob("*.yaml")} - {"base_attack"}


def test_the_readme_has_a_row_for_every_config_group():
    assert set(readme_options()) == set(GROUPS)


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_the_readme_lists_exists_and_every_option_is_listed(group):
    listed, present = readme_options()[group], conf_options(group)
    assert listed - present == set(), f"the README names {group} options that conf/ lacks"
    assert present - listed == set(), f"conf/ has {group} options the README's table does not name"
