"""`python -m dockercomp`: the same as the `dockercomp` command."""

from dockercomp.cli import main

if __name__ == "__main__":
    main(prog_name="dockercomp")
