#!/usr/bin/env python3
"""Lists, for each module of a crate (give its src/ directory), the crate's
modules it imports (use crate::/super::, inline crate:: paths, to modules
or to their types; in a module with children, its child:: paths; test
modules left out), and prints any import circle. `layering.rs` in the
server crate applies the same rules in a test."""
import os, re, sys
root = sys.argv[1]
mods = {}
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith('.rs') and f not in ('main.rs',):
            p = os.path.join(d, f); rel = os.path.relpath(p, root)[:-3]
            parts = rel.split('/')
            if parts[-1] == 'mod': parts = parts[:-1]
            if parts == ['lib']: continue
            mods['::'.join(parts)] = p
def resolve(path):
    segs = path.split('::')
    best = None
    for i in range(1, len(segs)+1):
        m = '::'.join(segs[:i])
        if m in mods: best = m
    return best
edges = {m: set() for m in mods}
for m, p in mods.items():
    src = open(p).read()
    src = re.split(r'#\[cfg\(test\)\]\s*mod tests \{', src)[0]  # tests may use anything of their own module
    src = re.sub(r'//.*', '', src)
    me = m.split('::')
    # A module with children: a mod.rs, or foo.rs beside a foo/ folder.
    is_dir = p.endswith('mod.rs') or os.path.isdir(p[:-3])
    # Paths to types count too (`super::RocksStore` is the parent module),
    # and `super::{A, B}` is the parent.
    for mo in re.finditer(r'\b(crate|super)::([A-Za-z_]\w*(?:::[A-Za-z_]\w*)*|\{)', src):
        kind, rest = mo.group(1), mo.group(2)
        rest = '' if rest == '{' else rest
        if kind == 'crate':
            if not rest: continue
            full = rest
        else:
            base = me[:-1]  # super of foo/bar.rs (or foo/bar/mod.rs) is foo
            full = '::'.join(base + (rest.split('::') if rest else []))
        t = resolve(full)
        if t and t != m: edges[m].add(t)
    if is_dir:  # `use child::...` in a module with children
        for mo in re.finditer(r'(?<![:\w])([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)::', src):
            t = resolve('::'.join(me + mo.group(1).split('::')))
            if t and t != m: edges[m].add(t)
for m in sorted(edges):
    print(f"{m:28} -> {', '.join(sorted(edges[m])) or '-'}")
# cycles via DFS
color = {}; stack = []; cycles = []
def dfs(u):
    color[u] = 1; stack.append(u)
    for v in edges[u]:
        if color.get(v) == 1: cycles.append(stack[stack.index(v):] + [v])
        elif v not in color: dfs(v)
    stack.pop(); color[u] = 2
for m in sorted(edges):
    if m not in color: dfs(m)
print("circles:", cycles if cycles else "none")
