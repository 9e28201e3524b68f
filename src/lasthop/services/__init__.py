"""Services: virtual addresses whose connections a pool of VMs serves
(docs/services.md). One module per job:

=============  ===============================================================
``model``      Service, ServiceVm, HealthCheck: the config's ``[[service]]``
               tables, the API's and the CLI's definitions (pydantic, no libbpf)
``store``      the state file: definitions, table ids and VM health across
               agent restarts
``lookup``     the data path's lookup mirrored: ``lh_services`` keys, which
               service a connection found, the ``lh_maglev`` tables
``maglev``     Maglev consistent hashing and the jhash2 mirror
``manager``    ServiceManager: model, state file and maps kept in step
``health``     the agent's health checks of the VMs
``api``        the REST API's ``/v1/services`` router
``cli``        ``lasthop service``
``metrics``    the services' Prometheus collector
=============  ===============================================================

Importing the package loads only the model (the config imports it).
"""

from __future__ import annotations

from lasthop.services.model import HealthCheck, Service, ServiceVm

__all__ = ["HealthCheck", "Service", "ServiceVm"]
