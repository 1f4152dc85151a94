"""The line-preserving rewrite that lets g++ compile an unchanged .cu file.

Only what C++ cannot express is rewritten, in place, without adding or removing a line, and the
output starts with a #line directive naming the source: a compile error, a fault or a
std::source_location in the emulated kernel points at the real .cu line. Everything else (the
CUDA keywords, builtins, cub, wmma, c10/cuda) comes from the headers in runtime/include.

- ``kernel<<<grid, block, shared, stream>>>(args)`` -> ``::emu::launch("kernel", <loc>, kernel,
  grid, block, shared, stream)(args)``;
- ``extern __shared__ T name[];`` -> a pointer to the launch's dynamic shared memory;
- ``__shared__ T name[N];`` -> a static (one block runs at a time, so one copy serves every block)
  that the runtime fills with garbage when the block first reaches it;
- ``TORCH_LIBRARY_IMPL(ns, CUDA, m)`` -> ``TORCH_LIBRARY_IMPL(<emulated ns>, CPU, m)``;
- ``.pinned_memory(true)`` -> ``.pinned_memory(false)`` (a CPU-only torch has no pinned memory);
- ``CUDA_KERNEL_ASSERT(cond)`` -> ``EMU_KERNEL_ASSERT(cond)``, a fault naming the thread (c10's
  host-pass definition calls ``__assert_fail``, which would abort the test process).
"""
from __future__ import annotations

import re


class RewriteError(ValueError):
    pass


def _mask_comments_and_strings(text: str) -> str:
    """text with comments and the contents of string and character literals blanked (newlines
    kept), so that patterns match code only, at the positions they have in the original."""
    out = list(text)

    def blank(i: int, j: int) -> None:
        for k in range(i, j):
            if out[k] != "\n":
                out[k] = " "

    i, n = 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif text[i] in "\"'":
            j = i + 1
            while j < n and text[j] not in (text[i], "\n"):
                j += 2 if text[j] == "\\" else 1
            blank(i + 1, min(j, n))
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _kernel_expression_start(code: str, end: int, path: str) -> int:
    """Start of the kernel expression that ends at `end` (just before <<<): a qualified name
    with an optional template argument list, e.g. histogram_kernel<scalar_t, true>."""
    i = end
    while i > 0 and code[i - 1] in " \t":
        i -= 1
    if i > 0 and code[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            if code[i] == ">":
                depth += 1
            elif code[i] == "<":
                depth -= 1
                if depth == 0:
                    break
        else:
            raise RewriteError(f"{path}:{_line_of(code, end)}: unbalanced template arguments before <<<")
    while i > 0 and (code[i - 1].isalnum() or code[i - 1] in "_:"):
        i -= 1
    if i == end or not (code[i].isalpha() or code[i] in "_:"):
        raise RewriteError(f"{path}:{_line_of(code, end)}: cannot find the kernel expression before <<<")
    return i


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?P<type>[^;\[]*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"(?<![\w])__shared__\s+(?P<decl>[^;{}]*?\b(?P<name>[A-Za-z_]\w*)\s*(?:\[[^\]]*\]\s*)*);")
_ALIGN = re.compile(r"__align__\s*\(\s*\d+\s*\)")
_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\(\s*(?P<ns>\w+)\s*,\s*CUDA\s*,")
_PINNED = re.compile(r"\.pinned_memory\(\s*true\s*\)")
_KERNEL_ASSERT = re.compile(r"(?<![\w])CUDA_KERNEL_ASSERT(?=\s*\()")


def rewrite(text: str, path: str, namespaces: dict[str, str]) -> str:
    """The rewritten translation unit for `text` (the contents of `path`). `namespaces` maps
    each op namespace with CUDA kernels in the file to the namespace the emulated kernels are
    registered in (as CPU kernels)."""
    code = _mask_comments_and_strings(text)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in original positions

    pos = 0
    while (start := code.find("<<<", pos)) >= 0:
        close = code.find(">>>", start + 3)
        if close < 0:
            raise RewriteError(f"{path}:{_line_of(code, start)}: <<< without >>>")
        first = _kernel_expression_start(code, start, path)
        kernel = text[first:start].strip()
        edits.append((first, start + 3, f'::emu::launch("{kernel}", ::emu::Loc::current(), {kernel}, '))
        edits.append((close, close + 3, ")"))
        pos = close + 3

    for m in _EXTERN_SHARED.finditer(code):
        type_ = _ALIGN.sub("", text[m.start("type"):m.end("type")]).strip()
        name = m.group("name")
        edits.append((m.start(), m.end(), f"{type_}* const {name} = ::emu::dynamic_shared_as<{type_}>();"))
    extern_spans = [(s, e) for s, e, _ in edits if text[s:e].lstrip().startswith("extern")]

    for m in _SHARED.finditer(code):
        if any(s <= m.start() < e for s, e in extern_spans):
            continue
        decl = text[m.start("decl"):m.end("decl")]
        name = m.group("name")
        edits.append((m.start(), m.end(), f"static {decl}; ::emu::shared_variable(&{name}, sizeof({name}));"))

    for m in _IMPL.finditer(code):
        ns = m.group("ns")
        if ns not in namespaces:
            raise RewriteError(f"{path}:{_line_of(code, m.start())}: no emulated namespace given for {ns}")
        edits.append((m.start(), m.end(), f"TORCH_LIBRARY_IMPL({namespaces[ns]}, CPU,"))

    for m in _PINNED.finditer(code):
        edits.append((m.start(), m.end(), ".pinned_memory(false)"))

    for m in _KERNEL_ASSERT.finditer(code):
        edits.append((m.start(), m.end(), "EMU_KERNEL_ASSERT"))

    out, last = [], 0
    for s, e, r in sorted(edits):
        if s < last:
            raise RewriteError(f"{path}:{_line_of(code, s)}: overlapping rewrites")
        out += [text[last:s], r]
        last = e
    out.append(text[last:])
    body = "".join(out)
    if body.count("\n") != text.count("\n"):
        raise RewriteError(f"{path}: the rewrite moved lines")  # a replacement spanned a newline
    return f'#line 1 "{path}"\n{body}'


def schema_unit(text: str, path: str, namespace: str, targets: list[str]) -> str:
    """A translation unit that defines the schemas of `TORCH_LIBRARY(namespace, m) {...}` in
    `text` (the contents of `path`) once for every namespace in `targets`."""
    code = _mask_comments_and_strings(text)
    m = re.search(rf"TORCH_LIBRARY\(\s*{re.escape(namespace)}\s*,\s*(\w+)\s*\)\s*\{{", code)
    if m is None:
        raise RewriteError(f"{path}: no TORCH_LIBRARY({namespace}, m) block")
    depth, i = 0, m.end() - 1
    while True:
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        if depth == 0:
            break
        i += 1
    body = text[m.end() - 1:i + 1]
    line = _line_of(code, m.start())
    units = [f'#line {line} "{path}"\nTORCH_LIBRARY({t}, {m.group(1)}) {body}\n' for t in targets]
    return "#include <torch/library.h>\n" + "".join(units)
