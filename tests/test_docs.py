"""The examples in the docstrings run, and the README's tag table matches the code."""

import doctest
import re
from pathlib import Path

import lightning_gradguard.stats as stats


def test_stats_docstring_examples_run():
    result = doctest.testmod(stats)
    assert result.attempted > 0 and result.failed == 0


def test_readme_documents_every_logged_prefix():
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    source = Path(stats.__file__).resolve().parent.joinpath("callbacks", "grad_norm_logger.py").read_text()
    prefixes = set(re.findall(r'f"([a-z_]+)/\{', source)) | {"grad_norm", "grad_norm_microbatch"}
    assert prefixes >= {"grad_norm", "param_norm", "update_ratio", "grad_max_abs", "grad_hist"}
    for prefix in prefixes:
        assert f"`{prefix}/" in readme, f"README does not document the `{prefix}/` tags"
