"""One module per command: parse options, call one stage function, render. No heavy imports."""
