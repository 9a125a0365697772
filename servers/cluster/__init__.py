"""Serving a layout across hosts on a Ray cluster (``harness serve/sim --ray ADDRESS``).

The one-host launcher (:mod:`servers.launcher`) decides what to serve and how on one machine;
this package adds the nodes. Modules, one concept each:

- :mod:`.node_placement`: which node and GPUs each replica gets (the one-host placement per node)
- :mod:`.plan`: the per-node commands (the one-host command builder), what ``--dry-run`` prints
- :mod:`.agent`: the Ray actor on each node that reads its topology and runs its servers
- :mod:`.session`: joining the cluster and putting one agent on each node
- :mod:`.launch`: start, watch and stop it all from the driver; endpoints.json and logs

Ray is an optional extra (``pip install '.[cluster]'``) and is imported only by :mod:`.session`
(and by the agent on the nodes): nothing here is needed on one host.
"""
