"""HetLoRA on Flower (flwr 1.41, Message API): the same server and client steps, over Flower's
simulation and deployment runtimes.

* :mod:`.strategy` -- :class:`~.strategy.HetLoRAStrategy`, a Flower ``Strategy`` that sends each
  node the global factors cut to its rank and aggregates the replies with the method's server;
* :mod:`.server_app`, :mod:`.client_app` -- the ServerApp (the in-process engine's run with
  training done by SuperNodes) and the ClientApp (one client per SuperNode);
* :mod:`.records` -- factors, tasks and replies as Flower records, and the checks on replies;
* :mod:`.project` -- the Flower App folder and its run configuration;
* :mod:`.certificates` -- TLS certificates and SuperNode keys for a trial;
* :mod:`.deploy`, :mod:`.launch`, :mod:`.processes` -- local SuperLink/SuperNodes or simulation,
  started and stopped by process id;
* ``python -m hetlora.runtime.flower`` (:mod:`.tool`) -- the command line.

Importing this package does not import Flower; its modules do.
"""
