"""``python -m ds4c``: the ``ds4c`` command line (also what ``torchrun ... -m ds4c run`` starts)."""

from ds4c.cli import main

if __name__ == "__main__":
    main()
