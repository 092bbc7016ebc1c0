"""HetLoRA on Flower (flwr 1.41, Message API): the same server and client steps, over Flower's
simulation and deployment runtimes.

* :mod:`.strategy` -- :class:`~.strategy.HetLoRAStrategy`, a Flower ``Strategy`` that sends each
  node the global factors cut to its rank and aggregates the replies with the method's server;
* :mod:`.server_app`, :mod:`.client_app` -- the ServerApp (the shared round loop,
  :class:`~hetlora.runtime.local.RoundLoop`, over the Grid) and the ClientApp (one client per
  SuperNode: its workspace and :func:`hetlora.client.run_task`, nothing else);
* :mod:`.records` -- factors, tasks and replies as Flower records (decoding only: replies are
  checked by the method server, as in-process);
* :mod:`.project` -- the Flower App folder and its run configuration;
* ``hetlora flower app`` (:mod:`.cli`) -- writes a run's Flower App folder, for ``flwr run`` on
  any SuperLink.

Starting and stopping local SuperLink/SuperNode processes, trial certificates and an in-memory
Grid, for demos and tests, are not part of the library: ``scripts/localfed`` (the
``scripts/flower_local.py`` commands).

Importing this package does not import Flower; its modules do.
"""
