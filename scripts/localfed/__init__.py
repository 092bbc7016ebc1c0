"""Flower federations on this machine, for demos and tests (not part of the installed library).

* :mod:`.processes` -- every process started, and its descendants, stopped by process id;
* :mod:`.deploy` -- a SuperLink and SuperNodes on 127.0.0.1 with TLS and SuperNode
  authentication (:class:`~.deploy.LocalDeployment`), or Flower's simulation runtime
  (:class:`~.deploy.LocalSimulation`);
* :mod:`.launch` -- one call for a whole run on either (:func:`~.launch.deploy_locally`,
  :func:`~.launch.simulate_locally`);
* :mod:`.certificates` -- a CA, the SuperLink's certificate and SuperNode keys, for a trial;
* :mod:`.loopback` -- a Flower Grid whose nodes are the real ClientApp called in-process (tests
  of the strategy and the ServerApp without processes);
* :mod:`.cli` -- ``python scripts/flower_local.py certificates|deploy|simulate``.

The tests import it from ``scripts/`` (pytest's ``pythonpath``); the scripts find it next to
them.
"""
