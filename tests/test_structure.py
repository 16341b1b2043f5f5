"""The shape of the code: a one-way module graph, one room per job, definitions a reader can see on
one screen. Parsed with `ast`, nothing imported: the code map in docs/development.md must be the
real import graph, listed bottom-up so that every module imports only modules in rows above it."""

import ast
import os
import re

import pytest

from conftest import ROOT

CODE_MAP = os.path.join(ROOT, "docs", "development.md")
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 400
MAX_MODULE_LINES = {"trainer.py": 450, "runtime.py": 350}


def project_modules():
    return sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py"))


def parse(module):
    with open(os.path.join(ROOT, module + ".py"), encoding="utf-8") as f:
        return ast.parse(f.read(), filename=module + ".py")


def imported_names(node):
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def import_graph():
    """{module: (project modules imported at module level, [(line, module) imported inside a def])}."""
    modules = set(project_modules())
    graph = {}
    for module in modules:
        tree = parse(module)
        top = {name for node in tree.body for name in imported_names(node) if name in modules}
        for node in tree.body:  # `if`/`try` blocks at module level still import at import time
            if isinstance(node, (ast.If, ast.Try)):
                top |= {name for sub in ast.walk(node) for name in imported_names(sub) if name in modules}
        nested = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                nested += [(sub.lineno, name) for sub in ast.walk(node) for name in imported_names(sub)
                           if name in modules]
        graph[module] = (top - {module}, sorted(set(nested)))
    return graph


def find_cycle(edges):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def code_map_rows():
    """[(module, {imported modules})] from the table between the code-map markers, in order."""
    with open(CODE_MAP, encoding="utf-8") as f:
        text = f.read()
    table = re.search(r"<!-- code map -->\n(.*?)<!-- /code map -->", text, re.S)
    assert table, f"{CODE_MAP}: no table between <!-- code map --> and <!-- /code map -->"
    rows = []
    for line in table.group(1).strip().splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        module = re.fullmatch(r"`(\w+)\.py`", cells[0])
        assert module, f"code map row does not start with a `module.py` cell: {line}"
        rows.append((module.group(1), set(re.findall(r"`(\w+)`", cells[-1]))))
    return rows


def test_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle({m: top for m, (top, _) in graph.items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_project_import_inside_a_function():
    """An import inside a function usually hides a cycle; third-party ones (gradio, diffusers) may stay lazy."""
    found = [f"{m}.py:{line} imports {name}" for m, (_, nested) in import_graph().items() for line, name in nested]
    assert not found, "project imports inside functions:\n  " + "\n  ".join(found)


def test_code_map_is_the_import_graph():
    graph = import_graph()
    rows = code_map_rows()
    listed = [m for m, _ in rows]
    assert sorted(listed) == sorted(graph), (f"code map lists {sorted(set(listed) - set(graph))} that do not exist "
                                             f"and misses {sorted(set(graph) - set(listed))}")
    assert len(listed) == len(set(listed)), "a module is listed twice"
    wrong = [f"{m}.py: the map says {sorted(says) or '—'}, the code imports {sorted(graph[m][0]) or '—'}"
             for m, says in rows if says != graph[m][0]]
    assert not wrong, "code map out of date:\n  " + "\n  ".join(wrong)
    above = set()
    for module, imports in rows:
        assert imports <= above, f"{module}.py imports {sorted(imports - above)}, listed below it in the code map"
        above.add(module)


def definitions():
    """(module, kind, name, lines) of every function, method and class."""
    for module in project_modules():
        for node in ast.walk(parse(module)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                yield module, kind, node.name, node.end_lineno - start + 1


def test_definitions_fit_on_a_screen():
    limits = {"function": MAX_FUNCTION_LINES, "class": MAX_CLASS_LINES}
    long = [f"{m}.py {kind} {name}: {n} lines (at most {limits[kind]})"
            for m, kind, name, n in definitions() if n > limits[kind]]
    assert not long, "\n  ".join(["too long:"] + long)


@pytest.mark.parametrize("name,limit", sorted(MAX_MODULE_LINES.items()))
def test_module_sizes(name, limit):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    assert lines <= limit, f"{name} has {lines} lines (at most {limit}): move side work to a module of its own"


def test_runtime_imports_nothing_of_the_project():
    assert import_graph()["runtime"][0] == set()


def test_the_checks_catch_what_they_name():
    """The helpers above on small known cases: a cycle is found, a clean graph is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    tree = ast.parse("import os\ndef f():\n    import config\n")
    nested = [name for node in ast.walk(tree.body[1]) for name in imported_names(node)]
    assert nested == ["config"]
