"""No function in vtm_jax/ is longer than 80 lines, docstring and comments included."""

import ast
import pathlib

import vtm_jax

PACKAGE = pathlib.Path(vtm_jax.__file__).parent
MAX_LINES = 80


def long_functions(root: pathlib.Path, limit: int) -> list[str]:
    """``path:line name (N lines)`` for every function or method over ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - first + 1
                if lines > limit:
                    rel = path.relative_to(root.parent)
                    found.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_80_lines():
    too_long = long_functions(PACKAGE, MAX_LINES)
    assert not too_long, "split these functions:\n" + "\n".join(too_long)


def test_the_check_sees_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (pkg / "m.py").write_text(f"def short():\n    pass\n\n\n@staticmethod\ndef long():\n{body}\n")
    assert long_functions(pkg, MAX_LINES) == [f"pkg/m.py:6 long ({MAX_LINES + 2} lines)"]
