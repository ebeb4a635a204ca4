"""`pyvm monitor`: one node-wide Prometheus endpoint over every sandbox's metrics socket.

Used only by ``shim.cli.monitor``. Layout: ``discovery`` (which sandboxes run, their CRI names),
``scrape`` (HTTP over a unix socket, bounded), ``relabel`` (merge the shims' expositions, adding
``sandbox_id``/``cri_*`` labels), ``server`` (the HTTP endpoint and the scrape fan-out).
"""
