"""The README's Python snippets still match the package.

The self-contained snippets (the Quickstart's dense and varlen calls, the
decode example) run as written and their results are checked against the
float64 oracle. The others are fragments of a larger program (a model's
``q_step``, a calibration's ``gates``, an initialised process group), so
for them every import must succeed and every call of a longattn function,
class or method whose target the snippet names must bind to its signature:
a renamed or removed argument in the package fails here, not in a user's
first try.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

import longattn
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
# The snippets that need nothing defined elsewhere: run whole.
SELF_CONTAINED = [i for i, text in enumerate(SNIPPETS) if text.startswith("import torch\nimport longattn\n")]


def test_the_readme_has_the_snippets_this_file_checks():
    assert len(SNIPPETS) >= 10 and len(SELF_CONTAINED) >= 2


def _quickstart_namespace() -> dict:
    """What the Quickstart's first snippet defines, which later snippets use."""
    namespace: dict = {}
    exec(compile(SNIPPETS[0], "README.md snippet 0", "exec"), namespace)  # noqa: S102 - our own README
    return namespace


@pytest.fixture(scope="module")
def quickstart():
    return _quickstart_namespace()


def _last_group(q, k, v):
    """The last kv head and its query heads (the oracle at the snippets' full
    size would take GiBs of float64; the last group also checks the GQA mapping)."""
    group = q.shape[-2] // k.shape[-2]
    return q[..., -group:, :], k[..., -1:, :], v[..., -1:, :]


def test_quickstart_dense_snippet_matches_the_oracle(quickstart):
    q, k, v, out, lse = (quickstart[name] for name in ("q", "k", "v", "out", "lse"))
    group = q.shape[2] // k.shape[2]
    rows = torch.arange(0, q.shape[1], 61)  # non-causal (the merge of the two halves): any rows stand alone
    q, k, v = _last_group(q[:, rows], k, v)
    ref_out, ref_lse = attention_ref(q, k, v)
    eager_out, eager_lse = longattn.attention(q, k, v, return_lse=True, backend="eager")
    assert_close_to_oracle(out[:, rows, -group:], ref_out, eager_out)
    assert_close_to_oracle(lse[:, -group:, rows], ref_lse, eager_lse, name="lse")


def test_varlen_snippet_runs_and_matches_the_oracle(quickstart):
    namespace = dict(quickstart)
    exec(compile(SNIPPETS[1], "README.md snippet 1", "exec"), namespace)  # noqa: S102
    q, k, v, cu, out, lse = (namespace[name] for name in ("q", "k", "v", "cu", "out", "lse"))
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    group = q.shape[1] // k.shape[1]
    for lo, hi in zip(cu.tolist(), cu[1:].tolist()):
        qs, ks, vs = _last_group(q[None, lo:hi], k[None, lo:hi], v[None, lo:hi])
        ref_out, ref_lse = attention_ref(qs, ks, vs, causal=True)
        eager_out, eager_lse = longattn.attention(qs, ks, vs, causal=True, return_lse=True, backend="eager")
        assert_close_to_oracle(out[None, lo:hi, -group:], ref_out, eager_out)
        assert_close_to_oracle(lse[None, -group:, lo:hi], ref_lse, eager_lse, name="lse")


@pytest.mark.parametrize("index", [i for i in SELF_CONTAINED if i != 0])
def test_self_contained_snippet_runs(index):
    namespace: dict = {}
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)  # noqa: S102
    if "decode_attention" in SNIPPETS[index]:
        # The decode example: one token attends to each sequence's cached keys plus its own.
        q, k_cache, v_cache, lens, out = (namespace[n] for n in ("q", "k_cache", "v_cache", "lens", "out"))
        for b, n in enumerate(lens.tolist()):
            ref = attention_ref(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], causal=True)[0]
            eager = longattn.attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], causal=True,
                                       backend="eager")
            assert_close_to_oracle(out[b:b + 1], ref, eager)


# --- the fragments: imports and call signatures -------------------------------

def _resolve(node: ast.expr, names: dict):
    """The object an expression like ``a.b.c`` names, or None when it is not
    known without running the program (a local value, a call's result)."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, names)
        return getattr(owner, node.attr, None) if owner is not None else None
    return None


def _is_ours(obj) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return callable(obj) and module.split(".")[0] == "longattn"


def _checked_calls(text: str, names: dict) -> list[str]:
    """Bind every resolvable longattn call of ``text`` to its signature (raises
    TypeError naming the call when one does not bind); return the calls checked.
    ``names`` holds the snippet's imports; a name assigned from a longattn
    class's constructor stands for that class, so its method calls bind too."""
    checked = []
    tree = ast.parse(text)
    for node in ast.walk(tree):  # a name bound to an instance: `cache = StreamingCache(...)`
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            cls = _resolve(node.value.func, names)
            if inspect.isclass(cls) and _is_ours(cls):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        names[target.id] = _Instance(cls)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = _resolve(node.func, names)
        if target is None or not _is_ours(target):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(kw.arg is None for kw in node.keywords):
            continue  # *args / **kwargs: nothing to bind by name
        args = [None] * len(node.args)
        kwargs = {kw.arg: None for kw in node.keywords}
        call = ast.unparse(node)
        try:
            inspect.signature(target).bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"README call `{call}` does not match {target.__qualname__}: {exc}") from None
        checked.append(call)
    return checked


class _Instance:
    """A stand-in for an instance of ``cls``: its attributes are the class's
    (methods bound, so ``self`` is not counted)."""

    def __init__(self, cls):
        self._cls = cls

    def __getattr__(self, name):
        attr = inspect.getattr_static(self._cls, name)
        if isinstance(attr, (staticmethod, classmethod)):
            return getattr(self._cls, name)
        if inspect.isfunction(attr):
            return _bound(attr)
        return None


def _bound(function):
    """``function`` without its first parameter (``self``), keeping its module."""
    def method(*args, **kwargs):
        raise AssertionError("never called")

    signature = inspect.signature(function)
    method.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    method.__module__, method.__qualname__ = function.__module__, function.__qualname__
    return method


def _imports(text: str) -> dict:
    """Run only the snippet's import statements (every one must succeed)."""
    namespace: dict = {"torch": torch, "longattn": longattn}  # the Quickstart's imports, which later snippets assume
    for node in ast.parse(text).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), "README.md", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_fragment_imports_and_calls_match_the_package(index):
    text = SNIPPETS[index]
    names = _imports(text)
    checked = _checked_calls(text, names)
    if any(isinstance(n, ast.Call) for n in ast.walk(ast.parse(text))):
        assert checked, f"snippet {index}: no longattn call could be checked"


def test_the_signature_check_catches_a_wrong_argument():
    names = _imports("from longattn.sparse import HiP, StreamingCache, Streaming")
    assert _checked_calls("HiP(topk=512)", dict(names)) == ["HiP(topk=512)"]
    with pytest.raises(TypeError, match="no_such_argument"):
        _checked_calls("longattn.attention(q, k, v, no_such_argument=1)", dict(names))
    with pytest.raises(TypeError, match="StreamingCache.append"):  # a method, through the assigned instance
        _checked_calls("c = StreamingCache(Streaming(1, 2), batch=1, nheads_k=1, headdim=8)\n"
                       "c.append(k, v, w, x, y, z)", dict(names))
