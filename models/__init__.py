"""Pure-torch building blocks of kdm: no I/O, no pipeline imports."""
