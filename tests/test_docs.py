"""The examples in the docstrings run, and the README's tag table matches the code."""

import doctest
import re
from pathlib import Path

import lightning_gradguard.stats as stats


def test_stats_docstring_examples_run():
    result = doctest.testmod(stats)
    assert result.attempted > 0 and result.failed == 0


def test_readme_documents_every_logged_prefix():
    root = Path(__file__).resolve().parents[1]
    readme = root.joinpath("README.md").read_text()
    # the logger builds grad_norm keys from a variable prefix
    prefixes: set[str] = {"grad_norm", "grad_norm_microbatch"}
    for path in root.joinpath("lightning_gradguard", "callbacks").glob("*.py"):
        prefixes |= set(re.findall(r'f?"([a-z_]+)/(?:\{|[a-z_])', path.read_text()))
    assert prefixes >= {"grad_norm", "param_norm", "update_ratio", "grad_max_abs", "grad_hist", "alarm", "amp"}
    for prefix in prefixes:
        assert f"`{prefix}/" in readme, f"README does not document the `{prefix}/` tags"
