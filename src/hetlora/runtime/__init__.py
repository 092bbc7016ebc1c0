"""Runtimes that drive a method's server: one round loop, two transports.

* :mod:`.workspace` -- the data and the PEFT-wrapped model every process of a run builds;
* :mod:`.rounds` -- one round (sample, exchange over a transport, check and fold replies) and
  its metrics row;
* :mod:`.local` -- :class:`~.local.RoundLoop` (every round, evaluation, checkpoints, summary)
  and :class:`~.local.Simulation`, the in-process run (the default);
* :mod:`.flower` -- the same round loop over Flower's Grid (ServerApp) and a ClientApp.
"""
