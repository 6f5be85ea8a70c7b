"""The demo (`make demo`, `python -m dockercomp.demo`): an embedded broker, a coordinator and
local agents render the Mandelbrot set tile by tile. An example of the library, not part of
any role, so Pillow is needed only here (the `demo` extra)."""
