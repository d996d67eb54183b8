"""Packaging: environment.yml matches pyproject.toml, and the import names cannot clash."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    got = {_name(r): r for r in pip_section if not r.startswith("-e")}
    assert set(got) == set(wanted), {"only in environment.yml": set(got) - set(wanted),
                                     "only in pyproject.toml": set(wanted) - set(got)}
    for name, req in wanted.items():  # the same version constraints, not just the same names
        assert got[name].replace(" ", "") == req.replace(" ", ""), (name, got[name], req)


def test_torch_is_pinned_to_the_cpu_build_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]


def test_kernels_import_name_cannot_clash_with_pypi_kernels(tmp_path):
    """PyPI has a package named `kernels` (transformers depends on it); ours is `minigemma.kernels`, a
    plain subpackage, so a top-level `kernels` is always PyPI's, also in a process started in our root."""
    import minigemma.kernels

    assert Path(minigemma.kernels.__file__).resolve().parent == ROOT / "minigemma" / "kernels"
    assert not (ROOT / "kernels").exists(), "a kernels/ folder in the root would shadow PyPI's `kernels`"
    # A decoy top-level `kernels` (standing for PyPI's) and ours, side by side in one process.
    decoy = tmp_path / "kernels"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("WHO = 'pypi'\n")
    code = ("import sys; sys.path.insert(0, %r); import kernels, minigemma.kernels as mk; "
            "print(kernels.WHO, mk.__file__)" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    who, path = out.stdout.split()
    assert who == "pypi" and Path(path).resolve().parent == ROOT / "minigemma" / "kernels"


def test_a_process_started_in_the_repository_can_import_transformers():
    """transformers imports PyPI's `kernels` (when installed) at import time; from the repository's root
    (on sys.path as '') nothing of ours may answer to that name."""
    code = ("import importlib.util, transformers.models.gemma3.modeling_gemma3; "
            "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.strip().splitlines()[-1]
    assert origin == "None" or "site-packages" in Path(origin).parts, origin  # an installed package, not ours


def test_core_install_does_not_hold_numpy_back():
    """recurrentgemma pins numpy<2.4; it is installed --no-deps so the core env keeps a current numpy."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    all_reqs = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    assert not any(_name(r) == "recurrentgemma" for r in all_reqs)
    import numpy

    assert tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4)


def test_public_api_names_are_stable():
    import types

    import minigemma
    import minigemma.generation  # importing the module must not shadow the function

    assert isinstance(minigemma.generate, types.FunctionType)
    assert minigemma.generate is minigemma.generation.generate
    from minigemma import Tokenizer, load_pretrained  # noqa: F401


def test_ci_treats_no_tests_collected_as_failure():
    """pytest exits 5 when it collects nothing; the CI wrapper must turn that into a failure."""
    r = subprocess.run(["bash", str(ROOT / ".ci" / "pytest.sh"), "tests/test_packaging.py", "-k", "no_such_test_zzz"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "collected no tests" in r.stderr


def test_ci_run_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme.split("\n## ")[0], "the README must open with `make test`"
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert lines[-1] == "make test", lines
