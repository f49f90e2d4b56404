"""Every third-party import in the project comes from a distribution pyproject.toml declares.

The check itself is the team's shared tool (`../shared/tools/check_imports.py`, beside every clone and
CI's); run in the test environment, it also flags direct imports of packages that arrive only through
another dependency, which a later release of that dependency could drop."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT

CHECKER = os.path.join(os.path.dirname(ROOT), "shared", "tools", "check_imports.py")


@pytest.mark.skipif(not os.path.isfile(CHECKER), reason="../shared/tools/check_imports.py is not beside this checkout")
def test_every_import_is_declared_in_pyproject():
    run = subprocess.run(
        [sys.executable, CHECKER, "--extras", "test"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and not run.stdout.strip(), f"undeclared imports:\n{run.stdout}{run.stderr}"
