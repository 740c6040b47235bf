"""``python -m qtool.models --markdown``: print the README's families table."""

import sys

from qtool.models.table import markdown_table

if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m qtool.models --markdown")
    print(markdown_table())
