"""The Redis side that carries the core: clients, the transport and its wire, the pub/sub
hub's threads, the renewer, the topology, and the Backend that holds them for one
SingleFlight."""
