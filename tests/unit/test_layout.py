"""The source layout: `platform/` is a source root that never shadows the standard library."""

import subprocess
import sys
import sysconfig
from pathlib import Path


def test_platform_is_not_a_package(repo):
    assert not (repo / "platform" / "__init__.py").exists()
    assert (repo / "platform" / "llmopt" / "__init__.py").is_file()


def test_import_platform_from_repo_root_is_stdlib(repo):
    code = "import platform, llmopt, jobs; print(platform.__file__); print(platform.python_version())"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    platform_file, version = out.stdout.split()
    assert Path(platform_file).parent == Path(sysconfig.get_paths()["stdlib"])
    assert version == ".".join(map(str, sys.version_info[:3]))


def test_each_package_lists_its_public_api():
    import llmopt.config
    import llmopt.data
    import llmopt.models
    import llmopt.serve
    import llmopt.train

    for module in (llmopt.config, llmopt.data, llmopt.models, llmopt.serve, llmopt.train):
        assert module.__all__, module.__name__
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.__all__ lists missing {name}"
