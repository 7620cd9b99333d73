"""``python -m toolkit ...``: the same command line as the installed ``toolkit`` script."""
from toolkit.cli import main

if __name__ == "__main__":
    main()
