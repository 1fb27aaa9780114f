"""``python -m mpchan``: the same as the ``mpchan`` command."""

from mpchan.cli import main

if __name__ == "__main__":
    main()
