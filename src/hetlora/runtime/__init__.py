"""Runtimes that drive a method's server: one round loop (:mod:`.local`, a round in
:mod:`.rounds`) over two transports, in-process and Flower (:mod:`.flower`), on the set-up every
process of a run shares (:mod:`.workspace`)."""
