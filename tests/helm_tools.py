"""Find and run the chart tools that .ci/install-tools.sh installs into .tools/, and locate the
CRD fixtures the chart is validated against.

In CI (``CI`` set) a missing tool fails the test that needs it, because a check
that silently skips never runs; on a developer's machine it skips with the
command that installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"
# Upstream KubeRay and Strimzi CRDs, kept in the repository so the chart tests need nothing beside it.
CRDS_DIR = REPO_ROOT / "tests" / "fixtures" / "crds"
INSTALL_HINT = "install the chart tools with: bash .ci/install-tools.sh"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_tool(name: str, env_var: str | None = None) -> str | None:
    """The tool's path: env_var when set (and only it), else the pinned copy in .tools/bin, else PATH."""
    if env_var and os.environ.get(env_var):
        chosen = Path(os.environ[env_var])
        return str(chosen) if _executable(chosen) else None
    pinned = TOOLS_BIN / name
    if _executable(pinned):
        return str(pinned)
    return shutil.which(name)


def require_tool(name: str, env_var: str | None = None) -> str:
    """The tool's path, or fail (in CI) / skip (elsewhere) saying how to install it."""
    path = find_tool(name, env_var)
    if path:
        return path
    if env_var and os.environ.get(env_var):
        message = f"{env_var}={os.environ[env_var]} is not an executable file"
    else:
        where = f"${env_var}, " if env_var else ""
        message = f"{name} not found in {where}{TOOLS_BIN} or PATH; {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Helm:
    """A helm binary whose cache, config and data stay in a scratch directory."""

    def __init__(self, binary: str, home: Path) -> None:
        self.binary = binary
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run helm with args; the caller checks returncode, stdout and stderr."""
        return subprocess.run([self.binary, *args], capture_output=True, text=True, env=self.env,
                              timeout=120, check=False)
