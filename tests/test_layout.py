"""The package's shape: stages import only downward, no import circles, every package installed, and
the installed `captioner` command works from any folder."""

import ast
import importlib.util
import os
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tiny_data import make_flickr_layout

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "captioner"

# The data flow, lowest first: a module may import from its own stage or a lower one, never a higher one.
STAGES = [
    {"errors", "choices", "atomic", "allocator", "config", "device", "distributed", "precision", "pretrained",
     "run_layout", "no_init"},
    {"data"},
    {"vision"},
    {"model"},
    {"eval"},
    {"analysis"},
    {"checkpoint"},
    {"train"},
    {"inference"},
    {"serve"},
    {"commands", "cli", "__main__", "__init__", "configs"},
]
RANK = {name: i for i, names in enumerate(STAGES) for name in names}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """captioner.* modules `path` imports at module level or inside functions (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("captioner"):
            if node.module != "captioner":  # `from captioner import checkpoint` names the submodule
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("captioner"))
    return found


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_module_imports_a_higher_stage():
    modules = _modules()
    assert set(map(_stage, modules)) <= set(RANK), "a new top-level module needs a stage in STAGES"
    upward = []
    for name, path in modules.items():
        if name == "captioner":  # the package's lazy `from captioner import Captioner` API
            continue
        for target in _imports(path):
            if target in modules and RANK[_stage(target)] > RANK[_stage(name)]:
                upward.append(f"{name} -> {target}")
    assert not upward, upward


def test_no_import_circles():
    modules = _modules()
    graph = {name: {t for t in _imports(path) if t in modules and t != name} for name, path in modules.items()}
    for name in graph:  # a package importing its own submodules is not a circle
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else nxt)
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_every_package_is_listed_for_installation():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")}
    assert present <= listed, sorted(present - listed)


def _environment_site_dirs() -> list[str]:
    """The site-packages folders this interpreter imports from: a venv's own (and its base's when it was
    made with --system-site-packages), a conda environment's, or the system's plus the user's."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def make_venv_seeing_this_environment(venv: Path) -> Path:
    """A fresh venv whose interpreter imports its own packages first, then this environment's; its python.

    `python -m venv --system-site-packages` is not that from inside a venv: the new venv is made from the
    base interpreter and sees the base's packages, not the venv's (torch, Pillow, ...). So the venv is made
    bare and a .pth file adds this environment's site folders (with their own .pth files) after its own.
    pip comes from this environment when it has one (Debian's python lacks ensurepip)."""
    has_pip = importlib.util.find_spec("pip") is not None
    subprocess.run([sys.executable, "-m", "venv", *(["--without-pip"] if has_pip else []), str(venv)],
                   check=True)
    py = venv / "bin" / "python"
    own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True).stdout.strip()
    line = f"import site; list(map(site.addsitedir, {_environment_site_dirs()!r}))\n"  # one line, exec'd
    (Path(own) / "_this_environment.pth").write_text(line)
    return py


@pytest.mark.slow
def test_installed_command_works_from_any_folder(tmp_path):
    """pip-installed (not editable) into a venv that sees this environment's packages, then run from a
    folder that is not the checkout: --help, caption with the shipped model, train on a tiny dataset with
    a named config, caption with the trained checkpoint, and resume with the run's stored paths."""
    venv = tmp_path / "venv"
    py = make_venv_seeing_this_environment(venv)
    build = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO, build, ignore=shutil.ignore_patterns(".git", "runs", "cache", "*.egg-info", "build",
                                                             "__pycache__", ".pytest_cache"))
    pip = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(build)],
                         capture_output=True, text=True)
    if pip.returncode and "bdist_wheel" in pip.stderr + pip.stdout:  # old setuptools without wheel
        pip = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(build)],
                             capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    captioner = str(venv / "bin" / "captioner")

    def run(*args):
        done = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert run(str(py), "-c", "import captioner; print(captioner.__file__)").startswith(str(venv))
    assert "caption" in run(captioner, "--help")
    photo = work / "street.jpg"
    shutil.copy(REPO / "examples" / "street.jpg", photo)
    out = run(captioner, "caption", "street.jpg")
    path, caption = out.strip().split("\t")
    assert path == "street.jpg" and len(caption.split()) >= 3
    assert run(str(py), "-m", "captioner", "caption", "street.jpg") == out

    data = make_flickr_layout(tmp_path / "tiny")
    run(captioner, "train", "--config", "tiny", "--data", str(data), "--run-dir", "run",
        "--set", "train.epochs=1", "--set", "data.cache_dir=cache")
    assert (work / "run" / "best.pt").is_file()
    trained = run(captioner, "caption", "--checkpoint", "run/best.pt", "street.jpg")
    assert trained.startswith("street.jpg\t")
    # The run stored absolute paths, so it resumes from another folder.
    other = tmp_path / "other"
    other.mkdir()
    done = subprocess.run([captioner, "train", "--resume", str(work / "run")], cwd=other, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
