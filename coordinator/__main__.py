"""`python -m coordinator`: the same as the `coordinator` command."""

from dockercomp.coordinator.cli import main

if __name__ == "__main__":
    main(prog_name="coordinator")
