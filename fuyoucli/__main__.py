"""`python -m fuyoucli` runs the same CLI as the `fuyou` command."""

from fuyoucli.cli.app import main

if __name__ == "__main__":
    main()
