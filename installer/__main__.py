"""`python -m installer`, the same as the `installer` console script."""

from dockercomp.installer.cli import main

main()
