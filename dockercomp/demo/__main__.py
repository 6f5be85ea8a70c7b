"""`python -m dockercomp.demo`: run the demo (see dockercomp.demo.run)."""

from dockercomp.demo.run import main

if __name__ == "__main__":
    main(prog_name="python -m dockercomp.demo")
