"""llmopt and jobs import inside a Ray worker whose working_dir is the repository."""

import pytest

pytestmark = pytest.mark.integration


def test_packages_import_in_ray_worker_with_repo_working_dir(ray_cluster, repo):
    ray = ray_cluster

    @ray.remote(num_cpus=0.1)  # the session cluster runs with the repo as working_dir
    def probe():
        import os
        import platform

        import jobs
        import jobs.evaluate
        import llmopt
        import llmopt.config

        return {
            "cwd": os.getcwd(),
            "jobs": jobs.__file__,
            "llmopt": llmopt.__file__,
            "platform_has_system": hasattr(platform, "system"),
            "config_ok": llmopt.config.RunConfig().name,
        }

    found = ray.get(probe.remote())
    assert found["platform_has_system"]
    assert found["config_ok"] == "llmopt-run"
    # jobs come from the uploaded working_dir copy, not from the checkout itself.
    assert found["jobs"].startswith(found["cwd"])
    assert found["llmopt"].endswith("llmopt/__init__.py")
