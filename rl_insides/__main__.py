"""``python -m rl_insides ARGS``: ``python cli.py ARGS`` of an installed copy (see rl_insides/__init__.py)."""

from cli import main

if __name__ == "__main__":
    main()
