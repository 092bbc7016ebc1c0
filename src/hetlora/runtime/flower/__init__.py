"""HetLoRA on Flower (flwr 1.41, Message API): the same server and client steps over Flower's
simulation and deployment runtimes. `.server_app` runs the shared round loop over the Grid
with `.strategy`; `.client_app` trains one client per SuperNode; `.records` is
what travels; `.project` the Flower App folder that ``hetlora flower app`` (`.cli`)
writes, for ``flwr run`` on any SuperLink.

Local SuperLink/SuperNode processes, trial certificates and an in-memory Grid, for demos and
tests, are not part of the library: ``scripts/localfed``. Importing this package does not import
Flower; its modules do.
"""
