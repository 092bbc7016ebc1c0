"""Runtimes that drive a method's server: one round loop (`.local`, a round in
`.rounds`) over two transports, in-process and Flower (`.flower`), on the set-up every
process of a run shares (`.workspace`)."""
