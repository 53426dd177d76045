"""Puts a Markdown table between `<!-- BEGIN NAME -->` and `<!-- END NAME -->` in
BENCHMARKS.md (appending the markers the first time), so that each bench script owns one
table and reruns replace it. Usage: python3 benches/put_table.py NAME TABLE"""
import sys

name, table = sys.argv[1], sys.argv[2]
path = "BENCHMARKS.md"
text = open(path).read()
begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
if begin in text:
    text = text[: text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end):]
else:
    text += f"\n{begin}\n{table}\n{end}\n"
open(path, "w").write(text)
