#!/usr/bin/env python3
"""Lists, for each module of a crate (give its src/ directory), the crate's
modules it imports (use crate::/super::, inline crate:: paths, a mod.rs's
child:: paths; test modules left out), and prints any import circle."""
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
    src = src.split('#[cfg(test)]')[0]  # tests may use anything of their own module
    src = re.sub(r'//.*', '', src)
    me = m.split('::')
    is_dir = p.endswith('mod.rs')
    parent = me[:-1] if not is_dir else me[:-1]
    for mo in re.finditer(r'\b(crate|super)((?:::[a-z_][a-z0-9_]*)+)', src):
        kind, rest = mo.group(1), mo.group(2)[2:]
        if kind == 'crate': full = rest
        else:
            base = me[:-1]  # super of a file module foo/bar.rs is foo
            full = '::'.join(base + rest.split('::')) if base else rest
        t = resolve(full)
        if t and t != m: edges[m].add(t)
    if is_dir:  # `use child::...` in a mod.rs
        for mo in re.finditer(r'(?<![:\w])([a-z_]+)::', src):
            t = resolve('::'.join(me + [mo.group(1)]))
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
