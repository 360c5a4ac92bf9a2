"""Term scopes: what keeps a kind's fragments from miscompiling the kernel they are pasted into.

A loss kind's fragments write Triton source as text (kernels/fragments.py). The generator never pastes
that text as it comes: each term's fragments are called through a `TermScope`, which

- hands them a term-scoped writer (`TermWriter`, the `TileWriter` they see). Every name a fragment
  assigns (`k.emit("b = ...")`, `k.cached("b", ...)`) is a local of the term, written into the kernel as
  `<kind>_<t>__b` together with the fragment's later reads of it, so that two kinds, or two terms of one
  kind, never collide and no fragment prefixes a name by hand. Kernel variables (the names `names`
  declares, the generator's own, the kernel's arguments), `tl`, the primitives and Python's builtins are
  read as they are, never renamed; a local may not hide one of them;
- checks every name a fragment reads against what is in scope at that point of the kernel: the term's
  locals, the kernel variables defined there (`KernelScope`: the generator's lines so far, scoped as
  Python scopes them, a tile loop's variables ending with the loop), the primitives and the builtins.
  Any other name is a `FragmentError` at generation that names the kind, the fragment method and the
  name (docs/architecture.md, "What a fragment may read, stage by stage");
- parses every expression a fragment returns (Python's `ast`) and hands it on as one operand of the
  place it lands in: `whole` (an assignment's value, a call's argument, inside parentheses) or `factor`
  (the right operand of `*`).
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Iterable
from functools import lru_cache

from . import names
from .fragments import BucketForm, FragmentError, KernelTerm, LinearGradient, TargetFragments, Vectors

# What a fragment may return as a value: one expression (not a tuple, an assignment or a lambda).
_NOT_VALUES = (ast.Tuple, ast.Starred, ast.NamedExpr, ast.Lambda, ast.Yield, ast.YieldFrom, ast.Await)
# Expressions that bind tighter than any operator: they are one operand anywhere as they are.
_ATOMS = (ast.Name, ast.Constant, ast.Call, ast.Subscript, ast.Attribute)


def parse_expression(text: str) -> ast.expr:
    """The expression `text` spells (without surrounding blanks); ValueError where it is not one value (a
    statement, a tuple, two expressions, a syntax error)."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"`{text}`, which is not one Python expression ({error.msg})") from None
    if isinstance(node, _NOT_VALUES):
        raise ValueError(f"`{text}`, a {type(node).__name__.lower()}, not one value")
    return node


def factor(text: str, node: ast.expr) -> str:
    """`text` as the right operand of `*`: as it is where it binds at least as tight (an atom, a negation,
    or a product or quotient, whose factors then join the left operand's: the same value, and per-row
    factors such as the term's weight fold into one), else parenthesized."""
    if isinstance(node, _ATOMS) or (isinstance(node, ast.UnaryOp) and not isinstance(node.op, ast.Not)):
        return text
    spine = node
    while isinstance(spine, ast.BinOp) and isinstance(spine.op, (ast.Mult, ast.Div)):
        spine = spine.left
    # a `%`, `//` or `@` on the spine does not re-associate with the product it would join
    mixed = isinstance(spine, ast.BinOp) and isinstance(spine.op, (ast.FloorDiv, ast.Mod, ast.MatMult))
    return text if spine is not node and not mixed else f"({text})"


def operand(text: str) -> str:
    """`text` parenthesized unless it is an atom (a name, a constant, a call, a subscript)."""
    text = text.strip()
    return text if isinstance(parse_expression(text), _ATOMS) else f"({text})"


def _renamed(text: str, tree: ast.AST, new_names: dict[int, str]) -> str:
    """`text` (which `tree` was parsed from) with the Name nodes keyed by id() in `new_names` renamed,
    in place: the rest of the text keeps its spelling."""
    data = text.encode()  # ast's columns count bytes
    starts = [0] + [index + 1 for index, byte in enumerate(data) if byte == ord("\n")]
    edits = [
        (starts[node.lineno - 1] + node.col_offset, starts[node.end_lineno - 1] + node.end_col_offset, node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and id(node) in new_names
    ]
    for start, end, node in sorted(edits, key=lambda edit: edit[0], reverse=True):
        data = data[:start] + new_names[id(node)].encode() + data[end:]
    return data.decode()


# --------------------------------------------------------------------------------------------------
# The kernel's variables in scope, from the lines the generator has written so far.
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _statement(text: str) -> ast.stmt | None:
    """The statement `text` starts (a block header gets an empty body), or None while it is incomplete."""
    for attempt in (text, text + "\n    pass"):
        try:
            body = ast.parse(attempt).body
        except SyntaxError:
            continue
        return body[0] if body else None
    return None


def _assigned(statement: ast.stmt) -> set[str]:
    """The names a simple statement binds (its targets; an import's names)."""
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in statement.names}
    return {node.id for node in ast.walk(statement) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


class KernelScope:
    """The kernel variables in scope at the end of the generator's lines, kept up to date as lines are
    added. A block's names (a `for` tile loop's, an `if` branch's) go out of scope where the block ends;
    the kernel's arguments and the imports stay. Lines the generator takes back (it rewrites a tile loop
    body under a label branch) are noticed, and the scope is read again from the start."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._seen: list[str] = []
        self._pending: list[str] = []  # the lines of a statement not complete yet (the kernel's `def`)
        self._pending_depth = 0
        self._frames: list[tuple[int, set[str]]] = [(0, set())]  # (depth of the block's body, its names)

    def names(self, lines: list[str], depth: int) -> set[str]:
        """The kernel variables in scope after `lines` (the kernel so far), at indentation `depth`."""
        if lines[: len(self._seen)] != self._seen:
            self._reset()
        for line in lines[len(self._seen) :]:
            self._read(line)
        self._seen = list(lines)
        return {name for body_depth, frame in self._frames if body_depth <= depth for name in frame}

    def _read(self, line: str) -> None:
        stripped = line.strip()
        if not self._pending:
            if not stripped or stripped.startswith("#"):
                return
            self._pending_depth = (len(line) - len(line.lstrip(" "))) // 4
            if stripped.startswith(("else", "elif ")) and stripped.split("#")[0].rstrip().endswith(":"):
                self._close(self._pending_depth)  # the branch before it ends; this one is a block of its own
                self._frames.append((self._pending_depth + 1, set()))
                return
        self._pending.append(stripped)
        statement = _statement("\n".join(self._pending))
        if statement is None:  # a statement over several lines (the kernel's `def`) goes on
            return
        self._pending = []
        depth = self._pending_depth
        self._close(depth)
        if isinstance(statement, ast.For):
            targets = {node.id for node in ast.walk(statement.target) if isinstance(node, ast.Name)}
            self._frames.append((depth + 1, targets))
        elif isinstance(statement, (ast.While, ast.If, ast.With)):
            self._frames.append((depth + 1, set()))
        elif isinstance(statement, ast.FunctionDef):
            arguments = statement.args
            self._frames.append((depth + 1, {a.arg for a in [*arguments.posonlyargs, *arguments.args]}))
        else:
            self._frames[-1][1].update(_assigned(statement))

    def _close(self, depth: int) -> None:
        """End the blocks whose bodies lie deeper than a statement at `depth`."""
        while self._frames[-1][0] > depth:
            self._frames.pop()


# --------------------------------------------------------------------------------------------------
# One term's fragments.
# --------------------------------------------------------------------------------------------------


def _identifier(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "term"
    return cleaned if not cleaned[0].isdigit() else f"k{cleaned}"


class TermScope:
    """One term's fragments as the generator calls them: each method calls the kind's fragment method
    of the same name with the term's `TermWriter`, then checks, renames and shapes what it returns.

    Results are strings for the place they land in: `whole` ones are one expression (an assignment's
    value, a call's argument, inside the generator's own parentheses), `factor` ones are operands of a
    product (the gradient and a `LinearGradient`'s coefficients, vectors and label part, which the
    generator writes as `weight * <factor>`)."""

    def __init__(self, t: int, term: KernelTerm, kernel: KernelScope, shared: frozenset[str]):
        self.generator = None  # the tile writer the fragments write with now (`writing_to`)
        self.t = t
        self.term = term
        self.kernel = kernel
        self.shared = shared  # names read anywhere as they are: the primitives and Python's builtins
        self.prefix = f"{_identifier(term.loss.name)}_{t}__"
        self.locals: set[str] = set()  # the names the term's fragments have assigned, in any method
        self.method = ""  # the fragment method running (for errors)
        self.writer = TermWriter(self)

    def writing_to(self, generator) -> TermScope:
        """This scope, its fragments writing with `generator` (a `tiles.Tiles`: the kernel's, or a copy's
        of a tile body) until the next call."""
        self.generator = generator
        return self

    def kernel_names(self) -> set[str]:
        """The kernel variables in scope where the generator writes now."""
        return self.kernel.names(*self.generator.kernel_lines())

    # -- the fragment methods, as the generator calls them -----------------------------------------

    def value_after_first_pass(self) -> str:
        return self._whole(self._call("value_after_first_pass"))

    def streamed_value(self) -> str:
        return self._whole(self._call("streamed_value"))

    def row_sums(self) -> tuple[str, ...]:
        return tuple(self._whole(summand) for summand in self._call("row_sums"))

    def value_from_row_sums(self) -> str:
        return self._whole(self._call("value_from_row_sums"))

    def row_diagnostics(self) -> tuple[str, ...]:
        return tuple(self._whole(value) for value in self._call("row_diagnostics"))

    def gradient(self) -> str | LinearGradient:
        gradient = self._call("gradient")
        if not isinstance(gradient, LinearGradient):
            return self._factor(gradient)
        parts = tuple((self._factor(coefficient), self._factor(vector)) for coefficient, vector in gradient.parts)
        at_label = None if gradient.at_label is None else self._factor(gradient.at_label)
        return LinearGradient(parts, at_label)

    def vector(self, v: Vectors) -> tuple[str, str]:
        value, gradient = self._call("vector", v)
        # the generator assigns the term's value before it adds the gradient
        return self._whole(value), self._whole(gradient, also=(names.value(self.t),))

    def bucket(self, v: Vectors) -> BucketForm:
        form = self._call("bucket", v)
        # the generator assigns the term's value (form.value) before the other two
        value = (names.value(self.t),)
        tail = self._whole(form.tail_factor, also=value) if form.tail_factor else ""
        return BucketForm(self._whole(form.value), self._whole(form.stored, also=value), tail)

    def bucket_tail_gradient(self, q: str, log_q: str) -> str:
        return self._whole(self._call("bucket_tail_gradient", q, log_q))

    # -- checks and renaming ---------------------------------------------------------------------------

    def _call(self, method: str, *arguments):
        self.method = method
        return getattr(self.term.loss, method)(self.writer, self.t, self.term, *arguments)

    def error(self, problem: str) -> FragmentError:
        return FragmentError(f"loss kind {self.term.loss.name!r} (term {self.t}), fragment `{self.method}`: {problem}")

    def _parsed(self, text: object) -> tuple[str, ast.expr]:
        """A returned expression, without surrounding blanks, and its tree."""
        if not isinstance(text, str):
            raise self.error(f"returned {text!r}, not an expression (a str of Triton source)")
        text = text.strip()
        try:
            return text, parse_expression(text)
        except ValueError as problem:
            raise self.error(f"returned {problem}") from None

    def _whole(self, text: str, also: Iterable[str] = ()) -> str:
        text, node = self._parsed(text)
        return self.resolved(text, node, also)

    def _factor(self, text: str) -> str:
        text, node = self._parsed(text)
        return factor(self.resolved(text, node), node)

    def resolved(self, text: str, tree: ast.AST, also: Iterable[str] = ()) -> str:
        """`text` (parsed as `tree`) with the term's locals renamed into its namespace, once every name it
        reads is found in scope here (or in `also`: names the generator defines before the text runs), and
        every name it assigns is a local of the term."""
        in_scope = self.kernel_names() | self.shared | set(also)
        new_names: dict[int, str] = {}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Name):
                continue
            if isinstance(node.ctx, ast.Load) and node.id not in self.locals:
                if node.id not in in_scope:
                    raise self.error(self._not_in_scope(node.id))
                continue
            if isinstance(node.ctx, ast.Load) and self.prefix + node.id not in in_scope:
                raise self.error(self._not_in_scope(node.id))
            if not isinstance(node.ctx, ast.Load):
                self.check_local(node.id, in_scope)
            new_names[id(node)] = self.prefix + node.id
        return _renamed(text, tree, new_names)

    def check_local(self, name: str, in_scope: set[str]) -> None:
        """A name the fragment assigns may not be a kernel variable in scope (unless it is its local already)."""
        if name not in self.locals and name in in_scope:
            raise self.error(
                f"assigns `{name}`, which is in scope here (a kernel variable, a primitive or a builtin); a "
                "fragment's local may not hide it: choose another name"
            )

    def _not_in_scope(self, name: str) -> str:
        if name in self.locals:
            return (
                f"reads its local `{name}`, which is not defined at this point of the kernel (a local assigned "
                "in a tile loop lives until the loop ends): assign it again here"
            )
        return (
            f"names `{name}`, which is not in scope here: not a local the term assigned before (k.emit, k.cached), "
            "nor a kernel variable defined at this point, nor `tl`, a primitive or a builtin (see "
            "docs/architecture.md, 'What a fragment may read, stage by stage')"
        )

    def emit(self, *lines: str) -> None:
        """The fragment's lines, statement by statement: reads checked, the term's names renamed."""
        text = "\n".join(lines)
        try:
            module = ast.parse(text)
        except SyntaxError as error:
            raise self.error(f"emits lines that are not Python statements ({error.msg}): {text!r}") from None
        for statement in module.body:
            source = ast.get_source_segment(text, statement)
            tree = ast.parse(source)
            renamed = self.resolved(source, tree)
            self.locals.update(_assigned(statement))
            self.generator.emit(*renamed.split("\n"))

    def cached(self, name: str, expression: str) -> str:
        if not isinstance(name, str) or not name.isidentifier():
            raise self.error(f"k.cached names {name!r}, which is not an identifier")
        text, node = self._parsed(expression)
        renamed = self.resolved(text, node)
        self.check_local(name, self.kernel_names())
        self.locals.add(name)
        self.generator.cached(self.prefix + name, renamed)
        return name

    def handed(self, text: str, method: str, as_operand: bool = False) -> str:
        """A kernel expression the writer hands the fragment (`k.q(...)`), as one operand where it may be
        more than a name (a target form's `p`): it must not name a local of the term, which the fragment's
        text would read instead."""
        try:
            text = operand(text) if as_operand else text
        except ValueError as problem:
            raise self.error(f"k.{method} gives {problem}") from None
        tree = ast.parse(text, mode="eval")
        hidden = sorted({node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} & self.locals)
        if hidden:
            raise self.error(
                f"its local `{hidden[0]}` hides the kernel variable `{hidden[0]}` that k.{method} returns: "
                "rename the local"
            )
        return text


class TermWriter:
    """The `TileWriter` a term's fragments see: the generator's tile vocabulary, with the term's names
    kept in its namespace (see `TermScope`)."""

    def __init__(self, scope: TermScope):
        self._scope = scope

    @property
    def _generator(self):
        return self._scope.generator

    def emit(self, *lines: str) -> None:
        self._scope.emit(*lines)

    def cached(self, name: str, expression: str) -> str:
        return self._scope.cached(name, expression)

    def q(self, slot: int) -> str:
        return self._scope.handed(self._generator.q(slot), "q")

    def log_q(self, slot: int) -> str:
        return self._scope.handed(self._generator.log_q(slot), "log_q")

    def log2_q(self, slot: int) -> str:
        return self._scope.handed(self._generator.log2_q(slot), "log2_q")

    def p(self, target: TargetFragments, slot: int) -> str:
        return self._scope.handed(self._generator.p(target, slot), "p", as_operand=True)

    def log_p(self, target: TargetFragments, slot: int) -> str:
        return self._scope.handed(self._generator.log_p(target, slot), "log_p", as_operand=True)

    def log2_p(self, target: TargetFragments, slot: int) -> str:
        return self._scope.handed(self._generator.log2_p(target, slot), "log2_p", as_operand=True)

    def onehot(self) -> str:
        return self._scope.handed(self._generator.onehot(), "onehot")

    def class_weight_tile(self, vector: int) -> str:
        return self._scope.handed(self._generator.class_weight_tile(vector), "class_weight_tile")

    def label_class_weight(self, vector: int) -> str:
        return self._scope.handed(self._generator.label_class_weight(vector), "label_class_weight")

    def class_weight_sum(self, vector: int) -> str:
        return self._scope.handed(self._generator.class_weight_sum(vector), "class_weight_sum")

    def scaled_label_logit(self, slot: int) -> str:
        return self._scope.handed(self._generator.scaled_label_logit(slot), "scaled_label_logit", as_operand=True)

    def teacher_log_p(self, teacher: int, slot: int) -> str:
        return self._scope.handed(self._generator.teacher_log_p(teacher, slot), "teacher_log_p")

    def teacher_log2_p(self, teacher: int, slot: int) -> str:
        return self._scope.handed(self._generator.teacher_log2_p(teacher, slot), "teacher_log2_p")

    def token_ids(self) -> str:
        return self._scope.handed(self._generator.token_ids(), "token_ids", as_operand=True)

    def log_mixture(self, beta: float, log_a: str, log_b: str) -> str:
        # the fragment's own expressions (renamed where the fragment's text lands), as operands
        return self._generator.log_mixture(beta, operand(log_a), operand(log_b))

    def constant_id(self, value: object) -> int:
        return self._generator.constant_id(value)


def term_scopes(spec, primitives: Iterable[str]) -> list[TermScope]:
    """A `TermScope` for each term of `spec` (a `KernelSpec`), sharing one view of the kernel's scope, read
    from the lines of the writer they write with. `primitives`: the names a generated module may import."""
    kernel = KernelScope()
    shared = frozenset(primitives) | frozenset(dir(builtins))
    return [TermScope(t, term, kernel, shared) for t, term in enumerate(spec.terms)]
