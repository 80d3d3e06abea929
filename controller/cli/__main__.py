"""`python -m controller.cli …`, the same as the `retort` console script."""

from controller.cli import main

if __name__ == "__main__":
    main()
