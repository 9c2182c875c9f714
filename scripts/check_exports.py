#!/usr/bin/env python3
"""Lint: every namespace-scope class/struct definition and non-inline function declaration in the
public headers (include/mdd/**/*.h) carries MDD_API (include/mdd/export.h).

The shared library is built with hidden visibility, so a public declaration without MDD_API compiles
but fails to link in user programs; tests link the object libraries and would not notice.
Usage: scripts/check_exports.py [include-dir]   (exit 1 and one line per miss)"""
import pathlib
import re
import sys

SKIP = ('using ', 'typedef ', 'template', 'inline ', 'static ', 'constexpr ', 'extern ', 'TORCH_MODULE',
        'TORCH_ARG', 'enum ', 'namespace', '#', '//', '}', 'friend ', 'public:', 'private:', 'protected:')


def statements(text):
    """Yields (line number, first line, statement) for each namespace-scope statement."""
    depth = 0
    start, stmt = None, ''
    for i, line in enumerate(text.split('\n')):
        s = line.strip()
        code = re.sub(r'//.*', '', s)
        code = re.sub(r'"(\\.|[^"\\])*"', '""', code).replace('{}', '')
        code = re.sub(r'=\s*\{[^{}]*\}', '= X', code)  # brace-initialised default arguments
        if code.startswith('#'):
            continue  # preprocessor lines
        if depth == 0 and start is None and code:
            if re.match(r'namespace\b', code) or (code.startswith('}') and '{' not in code):
                continue  # namespace braces are not counted
            start, stmt = i, ''
        if start is not None and depth == 0:
            stmt += ' ' + code
            if ';' in code or '{' in code:
                yield start + 1, text.split('\n')[start].strip(), stmt
                start = None
        depth = max(0, depth + code.count('{') - code.count('}'))


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent.parent / 'include/mdd')
    misses = []
    for p in sorted(root.rglob('*.h')):
        if p.name in ('export.h', 'mdd.h', 'version.h'):
            continue
        for n, first, stmt in statements(p.read_text()):
            if 'MDD_API' in first or first.startswith(SKIP):
                continue
            if re.match(r'(class|struct) \w+', first) and '{' in stmt:
                misses.append(f'{p}:{n}: type without MDD_API: {first}')
            elif '(' in stmt and stmt.rstrip().endswith(';') and '{' not in stmt and not re.match(r'(class|struct)\b', first):
                misses.append(f'{p}:{n}: function without MDD_API: {first}')
    for m in misses:
        print(m)
    if misses:
        print(f'check_exports: {len(misses)} public declarations lack MDD_API (include/mdd/export.h)')
        return 1
    print(f'check_exports: ok ({root})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
