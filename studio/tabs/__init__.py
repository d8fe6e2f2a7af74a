"""One module per tab; each create_*_tab(studio) builds its widgets, wires them and returns them."""
