"""Regenerate the README's config reference table from trainval.app.config.SCHEMA (a test checks they match)."""

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from trainval.app import config  # noqa: E402

path = os.path.join(os.path.dirname(__file__), "..", "README.md")
text = open(path).read()
table = config.reference_table()
new, n = re.subn(r"\| key \| type \| default \| meaning \|\n(\|.*\|\n)+", lambda m: table + "\n", text, count=1)
if n != 1:
    sys.exit("README.md has no config reference table to replace")
open(path, "w").write(new)
print("README.md config reference updated")
