"""AST mutants of a Python source file: one small, plausible bug at one place each.

Kinds of change:
    arithmetic   + <-> -, * <-> /, // -> /, % -> //, ** -> *, also in augmented assignments
    accumulate   ``x += y`` -> ``x = y`` (a sum overwritten instead of accumulated)
    comparison   < <-> <=, > <-> >=, == <-> !=, is <-> is not, in <-> not in
    boolean      and <-> or
    negate       an if / while / conditional-expression / comprehension test negated; ``not x`` -> ``x``
    constant     ints 0 -> 1, 1 -> 0 and 2, n -> n - 1 and n + 1 (off by one, indices included);
                 True <-> False; 0.0 <-> 1.0
    sign         ``-x`` -> ``x``
    arguments    the first two positional arguments of a call swapped

A mutant replaces the exact source span of one node with the unparsed mutated node, so the rest of
the file (comments, layout) is untouched. Nothing inside annotations or f-strings is mutated, and a
mutant whose source does not compile or parses to the original tree is dropped.
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass

ARITHMETIC = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
              ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}
COMPARISON = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
              ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BOOLEAN = {ast.And: ast.Or, ast.Or: ast.And}
# calls whose first two arguments commute (transpose(a, b) is transpose(b, a)): swapping them gives
# an equivalent mutant
SYMMETRIC_CALLS = {"max", "min", "maximum", "minimum", "hypot", "gcd", "isclose", "allclose", "equal", "transpose",
                   "swapaxes", "swapdims"}


@dataclass(frozen=True)
class Mutant:
    """One change: the source span [(line, col), (end_line, end_col)) (1-based lines, character
    columns) of ``before`` becomes ``after``."""

    path: str
    line: int
    col: int
    end_line: int
    end_col: int
    kind: str
    before: str
    after: str

    def describe(self) -> str:
        return f"{_one_line(self.before)} -> {_one_line(self.after)}"

    def apply(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        start = sum(len(s) for s in lines[:self.line - 1]) + self.col
        end = sum(len(s) for s in lines[:self.end_line - 1]) + self.end_col
        return source[:start] + self.after + source[end:]


def _one_line(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _replacements(node: ast.AST):
    """(kind, mutated copy of node) for every mutation of this node itself."""
    def variant(**fields):
        new = copy.copy(node)
        for name, value in fields.items():
            setattr(new, name, value)
        return new

    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        yield "arithmetic", variant(op=ARITHMETIC[type(node.op)]())
    elif isinstance(node, ast.AugAssign):
        if type(node.op) in ARITHMETIC:
            yield "arithmetic", variant(op=ARITHMETIC[type(node.op)]())
        yield "accumulate", ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno)
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in COMPARISON:
                ops = list(node.ops)
                ops[i] = COMPARISON[type(op)]()
                yield "comparison", variant(ops=ops)
    elif isinstance(node, ast.BoolOp):
        yield "boolean", variant(op=BOOLEAN[type(node.op)]())
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "negate", node.operand
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield "sign", node.operand
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield "constant", ast.Constant(not node.value)
    elif isinstance(node, ast.Constant) and isinstance(node.value, int):
        v = node.value
        for new in ((1,) if v == 0 else (0, 2) if v == 1 else (v - 1, v + 1)):
            yield "constant", ast.Constant(new)
    elif isinstance(node, ast.Constant) and isinstance(node.value, float) and node.value in (0.0, 1.0):
        yield "constant", ast.Constant(1.0 - node.value)
    elif isinstance(node, ast.Call) and len(node.args) >= 2 and not any(isinstance(a, ast.Starred) for a in node.args[:2]) \
            and _call_name(node) not in SYMMETRIC_CALLS:
        a, b = node.args[:2]
        if ast.dump(a) != ast.dump(b):
            yield "arguments", variant(args=[b, a, *node.args[2:]])


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _tests(tree: ast.AST):
    """Conditions that the 'negate' kind wraps in ``not``."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.While, ast.IfExp)):
            yield node.test
        elif isinstance(node, ast.comprehension):
            yield from node.ifs


def _skipped(tree: ast.AST) -> set:
    """ids of nodes inside annotations and f-strings (mutating them is meaningless or unplaceable)."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            roots += [node.returns] + [a.annotation for a in
                                       (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs,
                                        node.args.vararg, node.args.kwarg) if a is not None]
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
        elif isinstance(node, ast.JoinedStr):
            roots.append(node)
    return {id(n) for root in roots if root is not None for n in ast.walk(root)}


def _column(lines: list, line: int, byte_col: int) -> int:
    """ast's UTF-8 byte column as a character column."""
    return len(lines[line - 1].encode()[:byte_col].decode())


def mutants(path: str, source: str) -> list:
    """Every valid mutant of source (the file at path), in source order."""
    tree = ast.parse(source)
    original = ast.dump(tree)
    skipped = _skipped(tree)
    lines = source.splitlines(keepends=True)
    changes = [(node, kind, new) for node in ast.walk(tree) if id(node) not in skipped
               for kind, new in _replacements(node)]
    changes += [(test, "negate", ast.UnaryOp(ast.Not(), test)) for test in _tests(tree)
                if id(test) not in skipped and not (isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not))]
    found = []
    for node, kind, new in changes:
        text = ast.unparse(new)
        if isinstance(node, ast.expr):
            text = f"({text})"  # keeps precedence wherever the expression sits
        m = Mutant(path, node.lineno, _column(lines, node.lineno, node.col_offset), node.end_lineno,
                   _column(lines, node.end_lineno, node.end_col_offset), kind, ast.get_source_segment(source, node), text)
        mutated = m.apply(source)
        try:
            if ast.dump(ast.parse(mutated)) == original:
                continue
            compile(mutated, path, "exec")
        except SyntaxError:
            continue
        found.append(m)
    return sorted(set(found), key=lambda m: (m.line, m.col, m.kind, m.after))
