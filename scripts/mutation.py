"""Mutation testing: change one operator, constant or statement of a module at a time and check its tests fail.

Usage (from the repository root)::

    python scripts/mutation.py labelstudio_maskclip/masks/brush.py tests/test_rle.py
    python scripts/mutation.py labelstudio_maskclip/learning/store.py tests/test_store.py --json store.json

For each mutant the script writes the mutated module into a scratch copy of the repository (the working
tree is never touched) and runs the given test files there with ``pytest -x``. A mutant is *killed* when the
tests fail (or run past the timeout), *survived* when they pass. The score is killed / all mutants.

To save time the tests are first run once with a line tracer on the module: a mutant is then tested only by
the tests that execute its line, plus every test that starts a subprocess (the tracer cannot see inside
those, so they are always run), fastest first; a line run at import time (a default value, a constant)
selects every test. A mutant on a line no test executes survives without a run.
Mutants run in a fixed shuffled order, so a run cut short by ``--budget`` has tested a fair sample.

Mutations (one per mutant, each applied to one AST node):
  - arithmetic and bitwise operators: ``+`` <-> ``-``, ``*`` <-> ``/``, ``//`` -> ``*``, ``%`` -> ``//``,
    ``**`` -> ``*``, ``<<`` <-> ``>>``, ``&`` <-> ``|``, ``^`` -> ``&`` (also in ``+=`` etc.)
  - comparisons: ``<`` <-> ``<=``, ``>`` <-> ``>=``, ``==`` <-> ``!=``, ``is`` <-> ``is not``, ``in`` <-> ``not in``
  - ``and`` <-> ``or``; ``not x`` -> ``x``; ``-x`` -> ``x``
  - numbers: ``n`` -> ``n + 1``; ``True`` <-> ``False``
  - ``return value`` -> ``return None``; ``break`` <-> ``continue``
  - a call statement (``conn.commit()``) removed (logging calls excepted)

Docstrings, other strings, annotations and ``__all__`` are left alone.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_BINOPS: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.BitXor: ast.BitAnd,
}
_CMPOPS: dict[type, type] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_SYMBOL = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
    ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.Lt: "<",
    ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not",
    ast.In: "in", ast.NotIn: "not in", ast.And: "and", ast.Or: "or",
}  # fmt: skip
_LOGGERS = {"log", "logger", "logging", "warnings"}


@dataclass
class Mutant:
    index: int  # position in the module's mutant list (stable for a given source)
    line: int
    description: str
    status: str = "pending"  # killed | survived | uncovered | timeout
    seconds: float = 0.0


def _skipped_nodes(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, ``__all__`` and ``if __name__ == "__main__"``."""
    skip: set[int] = set()

    def drop(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                drop(body[0])
        if isinstance(node, ast.arg):
            drop(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            drop(node.returns)
        if isinstance(node, ast.AnnAssign):
            drop(node.annotation)
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                drop(node)
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            drop(node)
    return skip


def _is_logging_call(call: ast.Call) -> bool:
    func = call.func
    while isinstance(func, ast.Attribute):
        func = func.value
    return isinstance(func, ast.Name) and func.id in _LOGGERS


def _sites(tree: ast.Module) -> list[tuple[ast.AST, int, str]]:
    """(node, variant, description) for every mutation of ``tree``, in a deterministic walk order."""
    skip = _skipped_nodes(tree)
    out: list[tuple[ast.AST, int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BINOPS:
            new = _BINOPS[type(node.op)]
            out.append((node, 0, f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}"))
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _CMPOPS:
                    out.append((node, i, f"{_SYMBOL[type(op)]} -> {_SYMBOL[_CMPOPS[type(op)]]}"))
        elif isinstance(node, ast.BoolOp):
            out.append((node, 0, f"{_SYMBOL[type(node.op)]} -> {'or' if isinstance(node.op, ast.And) else 'and'}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            out.append((node, 0, f"{'not x' if isinstance(node.op, ast.Not) else '-x'} -> x"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            out.append((node, 0, f"{node.value} -> {not node.value}"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            out.append((node, 0, f"{node.value!r} -> {node.value + 1!r}"))
        elif isinstance(node, ast.Return) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                out.append((node, 0, "return value -> return None"))
        elif isinstance(node, (ast.Break, ast.Continue)):
            out.append((node, 0, "break -> continue" if isinstance(node, ast.Break) else "continue -> break"))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and not _is_logging_call(node.value):
            out.append((node, 0, "call statement removed"))
    return out


class _Apply(ast.NodeTransformer):
    def __init__(self, target: ast.AST, variant: int):
        self.target, self.variant = target, variant

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        if node is not self.target:
            return node
        if isinstance(node, (ast.BinOp, ast.AugAssign)):
            node.op = _BINOPS[type(node.op)]()
        elif isinstance(node, ast.Compare):
            node.ops[self.variant] = _CMPOPS[type(node.ops[self.variant])]()
        elif isinstance(node, ast.BoolOp):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif isinstance(node, ast.UnaryOp):
            return node.operand
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            node.value = not node.value
        elif isinstance(node, ast.Constant):
            node.value = node.value + 1
        elif isinstance(node, ast.Return):
            node.value = None
        elif isinstance(node, ast.Break):
            return ast.copy_location(ast.Continue(), node)
        elif isinstance(node, ast.Continue):
            return ast.copy_location(ast.Break(), node)
        elif isinstance(node, ast.Expr):
            return ast.copy_location(ast.Pass(), node)
        return node


def mutants(source: str) -> list[Mutant]:
    tree = ast.parse(source)
    return [Mutant(i, getattr(n, "lineno", 0), d) for i, (n, _, d) in enumerate(_sites(tree))]


def mutated_source(source: str, index: int) -> str:
    tree = ast.parse(source)
    node, variant, _ = _sites(tree)[index]
    return ast.unparse(ast.fix_missing_locations(_Apply(node, variant).visit(tree)))


# --- which tests execute which line ------------------------------------------------------------------------

_TRACER_PLUGIN = """
import json, os, subprocess, sys, threading
_TARGET = os.path.realpath(os.environ["MUTATION_TARGET"])
_lines = {}
_current = [None]
_spawned = set()
_orig_popen_init = subprocess.Popen.__init__

def _popen_init(self, *a, **k):
    if _current[0]:
        _spawned.add(_current[0])
    return _orig_popen_init(self, *a, **k)

subprocess.Popen.__init__ = _popen_init

_is_target = {}

def _trace(frame, event, arg):
    name = frame.f_code.co_filename
    hit = _is_target.get(name)
    if hit is None:
        hit = _is_target[name] = os.path.realpath(name) == _TARGET
    if not hit:
        return None
    def local(frame, event, arg):
        if event == "line":  # outside a test (import time: defaults, constants) it counts for every test
            _lines.setdefault(frame.f_lineno, set()).add(_current[0] or "*")
        return local
    return local(frame, event, arg)

def pytest_runtest_setup(item):
    _current[0] = item.nodeid

_seconds = {}

def pytest_runtest_logreport(report):
    _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration

def pytest_configure(config):
    sys.settrace(_trace)
    threading.settrace(_trace)

def pytest_unconfigure(config):
    sys.settrace(None)
    mods = sorted({m.split(".")[0] for m in sys.modules})
    with open(os.environ["MUTATION_MAP"], "w") as f:
        json.dump({"lines": {str(k): sorted(v) for k, v in _lines.items()}, "spawn": sorted(_spawned),
                   "modules": mods, "seconds": _seconds}, f)
"""


def _preload(modules: list[str]) -> None:
    """Import the third-party modules the tests use, once, in this process: every forked mutant run then
    starts with them loaded. The package and the tests themselves are never imported here."""
    for name in modules:
        if name in ("labelstudio_maskclip", "tests", "mutation_tracer", "__main__") or name.startswith("_"):
            continue
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - a module that cannot load here is simply imported by the child
            pass


def _forked_pytest(work: Path, args: list[str], timeout: float) -> tuple[int, float]:
    """``pytest -x`` on ``args`` in a forked child of this process (no interpreter start per mutant)."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: run the tests against the scratch copy, report by exit status
        try:
            os.chdir(work)
            sys.path.insert(0, str(work))
            os.environ["PYTHONPATH"] = str(work)  # for subprocesses the tests start
            os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
            sys.dont_write_bytecode = True
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            import pytest

            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *args]))
        except BaseException:  # noqa: BLE001
            code = 99
        os._exit(code)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return (os.waitstatus_to_exitcode(status) or 0), time.monotonic() - start
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return -1, time.monotonic() - start
        time.sleep(0.02)


def _pytest(work: Path, args: list[str], timeout: float, env_extra: dict[str, str] | None = None) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", *args]
    start = time.monotonic()
    try:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=timeout).returncode  # fmt: skip
    except subprocess.TimeoutExpired:
        rc = -1
    return rc, time.monotonic() - start


def _scratch_copy() -> Path:
    work = Path(tempfile.mkdtemp(prefix="mutation-"))
    for name in ("labelstudio_maskclip", "tests", "docker", "docs", "benchmarks", "scripts"):  # what tests read
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.cfg", "README.md", "BENCHMARKS.md", "Makefile"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, work / name)
    return work


def run(module: str, tests: list[str], deselect: list[str], budget: float | None, only: set[int] | None) -> dict:
    source = (ROOT / module).read_text()
    found = [m for m in mutants(source) if only is None or m.index in only]
    random.Random(0).shuffle(found)  # a run cut short by --budget has tested a fair sample
    work = _scratch_copy()
    target = work / module
    extra = [a for d in deselect for a in ("--deselect", d)]
    try:
        (work / "mutation_tracer.py").write_text(_TRACER_PLUGIN)
        map_file = work / "map.json"
        rc, baseline = _pytest(work, ["-p", "mutation_tracer", *tests, *extra], 1800,
                               {"MUTATION_TARGET": str(target), "MUTATION_MAP": str(map_file)})  # fmt: skip
        if rc != 0:
            raise SystemExit(f"the tests fail without any mutation (exit {rc}); fix them first")
        traced = json.loads(map_file.read_text())
        lines = {int(k): v for k, v in traced["lines"].items()}
        spawners = traced["spawn"]
        seconds = traced["seconds"]
        _preload(traced["modules"])
        rc, clean = _forked_pytest(work, [*tests, *extra], 3 * baseline + 30)
        if rc != 0:  # the forked runner must pass on the unmutated module, or every mutant would look killed
            raise SystemExit(f"the forked test run fails without any mutation (exit {rc})")
        timeout = 3 * clean + 30  # a mutant running this long is stuck (an endless loop): counted as killed
        started = time.monotonic()
        for m in found:
            if budget is not None and time.monotonic() - started > budget:
                break
            tree_lines = _node_lines(source, m.index)
            selected = {t for ln in tree_lines for t in lines.get(ln, ())} | set(spawners)
            if "*" in selected:  # run at import time: any test may depend on it
                selected = (selected - {"*"}) | set(seconds)
            selected = sorted(selected, key=lambda t: (seconds.get(t, 0.0), t))  # fastest first: -x stops early
            if not selected:
                m.status = "uncovered"
                continue
            target.write_text(mutated_source(source, m.index))
            rc, m.seconds = _forked_pytest(work, selected, timeout)
            m.status = "timeout" if rc == -1 else ("killed" if rc != 0 else "survived")
            print(f"{m.status:9} #{m.index} {module}:{m.line}  {m.description}  ({m.seconds:.1f} s)", flush=True)
        target.write_text(source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    done = [m for m in found if m.status != "pending"]
    killed = sum(m.status in ("killed", "timeout") for m in done)
    return {
        "module": module,
        "tests": tests,
        "deselected": deselect,
        "mutants": len(found),
        "tested": len(done),
        "killed": killed,
        "score": round(100.0 * killed / len(done), 1) if done else None,
        "baseline_seconds": round(baseline, 1),
        "survivors": [asdict(m) for m in done if m.status in ("survived", "uncovered")],
    }


def _node_lines(source: str, index: int) -> set[int]:
    node, _, _ = _sites(ast.parse(source))[index]
    return set(range(node.lineno, (getattr(node, "end_lineno", None) or node.lineno) + 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("module", help="the module to mutate, a path from the repository root")
    p.add_argument("tests", nargs="+", help="its test files")
    p.add_argument("--deselect", action="append", default=[], help="a test node id to leave out (repeatable)")
    p.add_argument("--budget", type=float, help="stop starting mutants after this many seconds")
    p.add_argument("--only", help="comma-separated mutant indexes (see --list) to test, e.g. earlier survivors")
    p.add_argument("--list", action="store_true", help="only list the mutants")
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    if args.list:
        for m in mutants((ROOT / args.module).read_text()):
            print(f"{m.index:4} {args.module}:{m.line}  {m.description}")
        return 0
    only = {int(i) for i in args.only.split(",")} if args.only else None
    summary = run(args.module, args.tests, args.deselect, args.budget, only)
    print(f"{summary['module']}: {summary['killed']}/{summary['tested']} killed ({summary['score']} %), "
          f"{summary['mutants']} mutants")  # fmt: skip
    for s in summary["survivors"]:
        print(f"  {s['status']:9} #{s['index']} line {s['line']}: {s['description']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
